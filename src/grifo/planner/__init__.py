"""`grifo plan`: replay a request trace over a topology in a discrete-event simulation that
places requests with the gateway's own ranking and policy code, and compare strategies.

Modules: `trace` (reading traces), `service` (the calibrated service-time model of a point),
`calibrate` (measuring a running point), `tenants` (who sends each request and where it may
run), `strategies`, `sim` (the event loop), `metrics`, `report`, `validate` (the simulator
against a real gateway) and `cli`. Nothing here is imported by the gateway's request path;
matplotlib is imported only when a report is drawn.
"""
