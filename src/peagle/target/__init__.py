"""Where target states come from: the Hugging Face target (`hf`), the offline cache's on-disk format
(`cache`), the engine choice (`states`), and vLLM (`vllm_engine`, `vllm_states`, `vllm_hs_connector`;
imported only when asked for); plus a real target to test with, SmolLM2-135M-Instruct (`real_model`)."""
