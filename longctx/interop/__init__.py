"""Adapters between longctx and other formats: they translate config dicts and state dicts, and read or
write nothing themselves (`longctx.checkpoint` does the file I/O).

    hf.config_from_hf_dict(d) -> GPTConfig      hf.hf_config_dict(config) -> dict
    hf.state_from_hf(hf_state, config)           hf.state_to_hf(state, dtype)
"""
