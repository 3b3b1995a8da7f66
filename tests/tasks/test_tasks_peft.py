"""PEFT methods: each trains only its own parameters, reloads to the same logits, merges where it can;
prefix tuning matches the model's own KV-cache path with the prefix pre-filled, and stays causal."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from longctx.errors import CheckpointError, ConfigError
from longctx.infer.cache import KVCache
from longctx.peft import (
    PeftSpec,
    apply_peft,
    count_parameters,
    is_peft_parameter,
    load_peft_state,
    merge_peft,
    peft_state_dict,
)
from longctx.tasks.heads import ClassificationModel

SPECS = {
    "lora": PeftSpec("lora", lora_r=4, lora_alpha=8),
    "houlsby": PeftSpec("adapter", adapter_kind="houlsby", adapter_size=8),
    "pfeiffer": PeftSpec("adapter", adapter_kind="pfeiffer", adapter_size=8),
    "prefix": PeftSpec("prefix", prefix_len=5),
}


def _ids(seed=1, B=2, T=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g)


def _step(model, ids, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    logits = model(ids)
    torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    ).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("name", list(SPECS))
def test_only_the_methods_parameters_train(name, make_model):
    model = make_model()
    base = {id(p): (n, p.detach().clone()) for n, p in model.named_parameters()}
    apply_peft(model, SPECS[name])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_peft_parameter(n) for n in trainable)
    assert set(peft_state_dict(model)) == set(trainable)
    before = peft_state_dict(model)
    for _ in range(2):  # two steps: a zero-initialised factor (LoRA B, adapter up) unblocks the other
        _step(model, _ids())
    params = {id(p): p for p in model.parameters()}
    for pid, (n, old) in base.items():
        assert pid in params, f"{n} was replaced rather than wrapped"
        assert torch.equal(params[pid], old), f"base parameter {n} changed"
    after = peft_state_dict(model)
    changed = [n for n in after if not torch.equal(after[n], before[n])]
    assert len(changed) == len(after), f"unchanged PEFT tensors: {sorted(set(after) - set(changed))}"


@pytest.mark.parametrize("name", list(SPECS))
def test_saved_adapter_reloads_to_the_same_logits(name, make_model, tmp_path):
    model = apply_peft(make_model(), SPECS[name])
    for _ in range(2):
        _step(model, _ids())
    model.eval()
    path = tmp_path / "adapter.safetensors"
    save_file(peft_state_dict(model), str(path))
    fresh = apply_peft(make_model(), SPECS[name]).eval()
    ids = _ids(seed=7)
    assert not torch.equal(fresh(ids), model(ids))  # the trained adapter does something
    load_peft_state(fresh, load_file(str(path)))
    assert torch.equal(fresh(ids), model(ids))
    with pytest.raises(CheckpointError, match="does not match"):
        load_peft_state(
            apply_peft(make_model(), PeftSpec("prefix", prefix_len=5) if name != "prefix" else SPECS["lora"]),
            load_file(str(path)),
        )


def test_lora_merges_to_the_same_function_and_the_others_refuse(make_model):
    model = apply_peft(make_model(), SPECS["lora"])
    for _ in range(3):
        _step(model, _ids())
    model.eval()
    merged = merge_peft(model, SPECS["lora"]).eval()
    assert not any(is_peft_parameter(n) for n, _ in merged.named_parameters())
    assert set(merged.state_dict()) == set(make_model().state_dict())  # a plain GPT again
    ids = _ids(seed=3)
    torch.testing.assert_close(merged(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert any(is_peft_parameter(n) for n, _ in model.named_parameters())  # the original keeps its LoRA
    for name in ("houlsby", "prefix"):
        with pytest.raises(ConfigError, match="cannot be merged"):
            merge_peft(apply_peft(make_model(), SPECS[name]), SPECS[name])


def test_trainable_counts_follow_the_methods_formulas(make_model):
    c = make_model().config  # d=32, 2 layers, 2 heads of 16, MHA
    d, L = c.d_model, c.n_layer
    n = {k: count_parameters(apply_peft(make_model(), s))[0] for k, s in SPECS.items()}
    assert n["lora"] == L * 4 * 4 * (d + d)  # 4 projections x r (in + out), all d x d here
    assert n["houlsby"] == L * 2 * (d * 8 + 8 + 8 * d + d)
    assert n["pfeiffer"] == L * (d * 8 + 8 + 8 * d + d)
    assert n["prefix"] == L * 2 * c.n_kv_head * 5 * c.head_dim
    head = ClassificationModel(apply_peft(make_model(), SPECS["prefix"]), 3)
    assert count_parameters(head)[0] == n["prefix"] + d * 3 + 3  # plus the task head


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 1, "n_head": 2}, {"position": "alibi"}])
def test_prefix_equals_the_base_model_with_the_prefix_in_its_kv_cache(overrides, make_model):
    """Prefix tuning = the base model continuing after P cached keys/values (the route of HF PEFT's
    past_key_values), computed here by model.py's own cache path."""
    torch.manual_seed(0)
    base = make_model(**overrides).eval()
    wrapped = apply_peft(make_model(**overrides), PeftSpec("prefix", prefix_len=4)).eval()
    with torch.no_grad():
        for block in wrapped.blocks:  # prefixes of the size of real keys, so they matter
            block.attn.prefix_k.normal_()
            block.attn.prefix_v.normal_()
    ids = _ids(T=12)
    B, T = ids.shape
    cache = KVCache(base.config, B, 4 + T, rotate_on_read=False)
    for i, block in enumerate(wrapped.blocks):
        cache.update(
            i,
            block.attn.prefix_k.detach().expand(B, -1, -1, -1),
            block.attn.prefix_v.detach().expand(B, -1, -1, -1),
        )
    cache.length = 4
    with torch.no_grad():
        ref = base.logits(base.hidden_states(ids, torch.arange(T).expand(B, T), cache=cache))
        out = wrapped(ids)
    # (under ALiBi the cached keys, like the prefix, sit at distances beyond position 0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, base(ids), atol=1e-3)


def test_prefix_is_seen_by_every_query_and_the_future_by_none(make_model):
    wrapped = apply_peft(make_model(), PeftSpec("prefix", prefix_len=4)).eval()
    with torch.no_grad():
        for block in wrapped.blocks:
            block.attn.prefix_v.normal_()
    base = make_model().eval()
    ids = _ids(T=16)
    later = ids.clone()
    later[:, 8:] = (later[:, 8:] + 1) % 256
    with torch.no_grad():
        out, out_later, plain = wrapped(ids), wrapped(later), base(ids)
    torch.testing.assert_close(out[:, :8], out_later[:, :8], rtol=0, atol=0)  # causal over real tokens
    assert (out - plain).abs().amax(-1).min() > 1e-3  # every position, the first included, sees the prefix


@pytest.mark.parametrize("name", ["prefix", "houlsby", "lora"])
def test_cached_generation_matches_the_full_forward(name, make_model):
    from longctx.infer.engine import generate_tokens

    model = apply_peft(make_model(), SPECS[name])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_peft_parameter(n):
                p.normal_(0, 0.5)
    model.eval()
    prompt = _ids(B=1, T=10)[0].tolist()
    new = generate_tokens(model, prompt, 6)
    seq = prompt[:]
    for _ in range(6):  # greedy without a cache, one full forward per token
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert new == seq[len(prompt) :]
