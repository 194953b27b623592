"""PyTorch <-> JAX interop: official CCLM `.th` files, HF XLM-R + Microsoft Swin initialisation, safetensors.

- `official`: `load(path, text_num_heads=None, **overrides)` / `save(path, model_config, params, layout)` of the
  official `{'model': state_dict, 'config'}` checkpoints (pre-training, retrieval, XVNLI, NLVR/MaRVL and VQA/xGQA
  layouts, 224 -> 384 px conversion); `workdir`: `cclm-jax import` / `export` through run directories.
- `pretrained`: `init_from_pretrained(model_config, xlmr_dir, swin_path, rng)` as the reference pre-training.
- `export`: `export_safetensors(out_dir, model_config, params)` -> `model.safetensors` + `config.json`.
- `layout` (the official key tables), `shapes` (abstract parameter shapes of each layout's model), `relpos`
  (relative position table resizing), `files` (memory-mapped tensor reading).

Submodules are imported explicitly; `layout`, `shapes` and `export` do not need torch.
"""
