"""LLMs outside the model under study: one backend interface (`backends.py`: the local jaxlora
model in process, or any OpenAI-compatible HTTP endpoint), the batched decoding engine both the
local backend and `jaxlora serve` use (`engine.py`), the server (`serve.py`), and the users of
the interface (training-format synthesis, the LLM judge)."""
