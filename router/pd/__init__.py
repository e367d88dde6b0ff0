"""The prefill/decode room: serving a split decision (``serving``) over vLLM's sequential
(``vllm``) or SGLang's concurrent (``sglang``) protocol, configured by the
``disaggregation`` section (``router.config.disaggregation``).
"""
