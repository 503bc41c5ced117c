"""Adapters that plug kvstore into inference engines, one module per engine.

Owns: nothing shared; each module owns one engine's interface (vllm.py: vLLM's KV
connector v1; sglang.py: SGLang's HiCache storage backend; lmcache.py: LMCache's
remote-storage plugin) and imports that engine only when it is itself imported.
Must never: be imported by kvstore's core (the engines are optional and their pins
conflict), or reach the store other than through kvstore.client.Client.
"""
