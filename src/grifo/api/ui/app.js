// grifo dashboard: polls /admin/dashboard once a second with the key given in the URL
// fragment (#key=..., never sent to the server) or the form; the key stays in this tab only.
"use strict";

const POLL_MS = 1000;
let key = sessionStorage.getItem("grifo-key") || "";
let previous = null; // the last answer, to turn counts into rates

function takeKeyFromFragment() {
  const match = location.hash.match(/key=([^&]+)/);
  if (match) {
    key = decodeURIComponent(match[1]);
    sessionStorage.setItem("grifo-key", key);
    history.replaceState(null, "", location.pathname); // the key leaves the address bar
  }
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (className) td.className = className;
  return td;
}

function fill(tableId, rows, build) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows.map(build));
}

function pair(a, b) {
  return `${a === null ? "–" : a} / ${b === null ? "–" : b}`;
}

function rate(point, now) {
  if (!previous) return null;
  const before = previous.points.find((p) => p.name === point.name);
  const seconds = now - previous.now;
  if (!before || seconds <= 0) return null;
  return ((point.answered - before.answered) / seconds).toFixed(1);
}

function usd(micros) {
  return `$${(micros / 1e6).toFixed(4)}`;
}

function render(data) {
  document.getElementById("who").textContent = `${data.role} · ${data.tenant || "all tenants"}`;
  const topology = document.getElementById("topology");
  topology.replaceChildren(
    ...["edge", "regional", "central"].map((tier) => {
      const box = document.createElement("div");
      box.className = "tier";
      const title = document.createElement("h3");
      title.textContent = tier;
      box.append(title);
      for (const p of data.points.filter((p) => p.tier === tier)) {
        const node = document.createElement("div");
        node.className = `node ${p.state}`;
        node.dataset.point = p.name;
        node.textContent = `${p.name} · ${p.jurisdiction}`;
        const detail = document.createElement("small");
        detail.textContent = `${p.site} · ${p.state} · ${p.in_flight} in flight`;
        node.append(detail);
        box.append(node);
      }
      return box;
    }),
  );
  fill("points", data.points, (p) => {
    const tr = document.createElement("tr");
    tr.dataset.point = p.name;
    tr.append(
      cell(p.name),
      cell(p.jurisdiction),
      cell(p.tier),
      cell(p.state === "up" ? "up" : `${p.state}: ${p.reason}`, `state-${p.state}`),
      cell(rate(p, data.now), "num rate"),
      cell(p.answered, "num served"),
      cell(`${p.in_flight} / ${p.concurrency_limit ?? "–"}`, "num"),
      cell(pair(p.answer_p50_ms, p.answer_p99_ms), "num"),
      cell(pair(p.first_token_p50_ms, p.first_token_p99_ms), "num"),
    );
    return tr;
  });
  fill("budgets", data.budgets, (b) => {
    const tr = document.createElement("tr");
    const share = b.limit_micros ? Math.min(1, b.spent_micros / b.limit_micros) : 0;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fillBar = document.createElement("span");
    fillBar.style.width = `${(share * 100).toFixed(1)}%`;
    if (b.projected_micros > b.limit_micros) fillBar.className = "hot";
    bar.append(fillBar);
    const barCell = document.createElement("td");
    barCell.append(bar);
    tr.append(
      cell(b.tenant),
      cell(`${usd(b.spent_micros)} / ${usd(b.limit_micros)}`, "num"),
      barCell,
      cell(usd(b.rate_micros_per_hour), "num"),
      cell(usd(b.projected_micros), "num"),
      cell(b.runs_out_at || "not this period"),
    );
    return tr;
  });
  fill("placements", data.placements, (d) => {
    const tr = document.createElement("tr");
    tr.append(
      cell(new Date(d.ts * 1000).toLocaleTimeString()),
      cell(d.tenant),
      cell(d.model),
      cell(d.point),
      cell(d.reason),
      cell(d.candidates.join(", ")),
    );
    return tr;
  });
  fill("audit", data.audit, (r) => {
    const tr = document.createElement("tr");
    tr.append(
      cell(r.seq, "num"),
      cell(new Date(r.done_ms).toLocaleTimeString()),
      cell(r.tenant),
      cell(r.point),
      cell(r.jurisdiction),
      cell(r.status),
      cell(r.cost_micros, "num"),
    );
    return tr;
  });
  previous = data;
}

function setStatus(text, className) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = `badge ${className}`;
}

async function poll() {
  if (!key) {
    document.getElementById("login").hidden = false;
    setStatus("key needed", "error");
    return;
  }
  try {
    const response = await fetch("/admin/dashboard", { headers: { authorization: `Bearer ${key}` } });
    const data = await response.json();
    if (!response.ok) {
      setStatus(data.error ? data.error.message : `HTTP ${response.status}`, "error");
      if (response.status === 401 || response.status === 403) {
        document.getElementById("login").hidden = false;
        return;
      }
    } else {
      render(data);
      setStatus("live", "live");
    }
  } catch (error) {
    setStatus(`gateway unreachable (${error.message})`, "error");
  }
  setTimeout(poll, POLL_MS);
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  key = document.getElementById("key").value.trim();
  sessionStorage.setItem("grifo-key", key);
  document.getElementById("login").hidden = true;
  poll();
});

takeKeyFromFragment();
poll();
