"""The serving tier, `lorakit serve`: one base model, many LoRA adapters, OpenAI- and vLLM-compatible HTTP endpoints.

    client ──► POST /v1/chat/completions {"model": "<adapter or base id>", "stream": true, ...}
                  │ validated, templated, tokenized (a 400 / 404 here never reaches the model)
                  ▼
    scheduler thread: loads the adapter if needed (--max-loras, least recently used evicted), then
    the continuous-batching engine prefills the request and adds it to the running batch; every
    step decodes all running rows in ONE forward, each row with its own adapter; a row leaves the
    batch as soon as it ends, and its text streams back token by token.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST
/v1/load_lora_adapter {"lora_name", "lora_path"}, POST /v1/unload_lora_adapter {"lora_name"},
GET /health (no key needed), GET /metrics (Prometheus), GET / (a playground comparing adapters).
Adapters load only from inside --adapter-root and the folders given at start. With --api-key
(or LORAKIT_API_KEY), every endpoint but /health needs `Authorization: Bearer KEY`.
"""
