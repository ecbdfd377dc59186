"""peftkit.serving against peft 0.21.2: a mixed batch (each row its own adapter), adapter sizes, latency.

Tiny BERT, GPT-2 (LoRA on Conv1D) and Llama from tests/families.py, each with test_multi_adapter's two random
adapters: "a" on the query/value projections (rank 4) and "b" on other layers and the embeddings (rank 2, rsLoRA)."""

import pytest
import torch
from safetensors import safe_open

from peftkit.lora import export_peft, merge_lora, save_adapter, unmerge_lora
from peftkit.multi_adapter import active_adapter, disable_adapter, set_adapter
from peftkit.serving import BASE, MixedLoRA, adapter_bytes, latency, mixed_batch, mixed_forward, mixed_generate

from families import build, inputs  # noqa: E402
from test_multi_adapter import LORA_FAMILIES, peft_lora, quiet, two_adapters  # noqa: E402
from tiny import assert_unchanged, snapshot  # noqa: E402

torch.set_num_threads(1)
NAMES = ["a", BASE, "b", "a"]  # one per row
DECODERS = [f for f in LORA_FAMILIES if f != "bert"]


def rows(batch: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in batch.items()}


def alone(model, name: str, batch: dict):
    """Row by row: what ``name`` alone gives (the base model for "__base__")."""
    if name == BASE:
        with disable_adapter(model):
            return model(**batch).logits
    return set_adapter(model, name)(**batch).logits


def peft_model(model, family, tmp_path):
    folders = {n: export_peft(set_adapter(model, n), tmp_path / n, None) for n in ["a", "b"]}
    return peft_lora(build(family), folders)


# --- the mixed batch ---
@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_each_row_gets_what_its_adapter_alone_gives(family):
    model, batch = two_adapters(family), inputs(family, batch=4)
    before = snapshot(set_adapter(model, "b"))
    mixed = mixed_forward(model, NAMES, **batch).logits
    assert_unchanged(model, before)
    assert active_adapter(model) == "b"
    for i, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[i:i + 1], alone(model, name, rows(batch, i)), msg=f"row {i} ({name})")
    torch.testing.assert_close(mixed[1:2], build(family)(**rows(batch, 1)).logits)  # "__base__": the base model


@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_the_mixed_batch_equals_peft_s_adapter_names(family, tmp_path):
    model, batch = two_adapters(family), inputs(family, batch=4)
    theirs = peft_model(model, family, tmp_path)
    for names in [NAMES, ["b", "b", BASE, "b"], [BASE] * 4]:
        torch.testing.assert_close(mixed_forward(model, names, **batch).logits,
                                   theirs(**batch, adapter_names=names).logits)


def test_rows_go_to_their_own_adapter_not_a_neighbour_s():
    model = two_adapters("llama")
    ids = inputs("llama", batch=1)["input_ids"].repeat(2, 1)  # two identical rows
    ab = mixed_forward(model, ["a", "b"], input_ids=ids).logits
    ba = mixed_forward(model, ["b", "a"], input_ids=ids).logits
    assert not torch.allclose(ab[0], ab[1])  # the same input, other adapters: other outputs
    torch.testing.assert_close(ab[:1], set_adapter(model, "a")(input_ids=ids[:1]).logits)  # not b's, swapped
    torch.testing.assert_close(ab[0], ba[1])
    torch.testing.assert_close(ab[1], ba[0])


def test_inside_the_block_the_layers_route_and_named_adapter_calls_are_refused():
    model = two_adapters("llama")
    with mixed_batch(model, ["a", "b"]) as inside:
        layers = {n: m for n, m in inside.named_modules() if isinstance(m, MixedLoRA)}
        assert {n.rsplit(".", 1)[-1] for n in layers} == {"q_proj", "v_proj", "k_proj", "o_proj", "embed_tokens"}
        q_proj = layers["model.layers.0.self_attn.q_proj"]
        assert list(q_proj.adapters) == ["a"] and q_proj.rows["a"] == [0]  # "b" does not wrap q_proj
        with pytest.raises(ValueError, match="disable"):
            set_adapter(model, "b")
    assert not any(isinstance(m, MixedLoRA) for m in model.modules())


@pytest.mark.parametrize("family", DECODERS)
def test_generate_with_mixed_rows_equals_each_adapter_alone_and_peft(family, tmp_path):
    model, batch = two_adapters(family), inputs(family, batch=3)
    names, options = ["b", BASE, "a"], dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    ours = quiet(mixed_generate, model, names, **batch, **options)
    for i, name in enumerate(names):
        row = rows(batch, i)
        if name == BASE:
            with disable_adapter(model):
                expected = quiet(model.generate, **row, **options)
        else:
            expected = quiet(set_adapter(model, name).generate, **row, **options)
        assert torch.equal(ours[i:i + 1], expected), f"row {i} ({name})"
    theirs = peft_model(model, family, tmp_path)
    assert torch.equal(ours, quiet(theirs.generate, **batch, **options, adapter_names=names))
    beams = dict(options, num_beams=2)
    assert torch.equal(quiet(mixed_generate, model, names, **batch, **beams),
                       quiet(theirs.generate, **batch, **beams, adapter_names=names))


def test_bad_requests_name_what_exists_and_change_nothing():
    model, batch = two_adapters("llama"), inputs("llama", batch=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'c'.*\['a', 'b'\].*'__base__'"):
        mixed_forward(model, ["a", "c"], **batch)
    with pytest.raises(TypeError, match="one per row"):
        mixed_forward(model, "a", **batch)
    with pytest.raises(ValueError, match="got 2 rows but adapter_names names 3"):
        mixed_forward(model, ["a", "b", "a"], **batch)  # refused at the first layer, inside the block
    with pytest.raises(ValueError, match="eval"):
        mixed_forward(model.train(), ["a", "b"], **batch)
    model.eval()
    with pytest.raises(RuntimeError, match="boom"), mixed_batch(model, ["a", "b"]):
        raise RuntimeError("boom")
    assert_unchanged(model, before)


def test_a_merged_adapter_is_refused_as_peft_refuses_it(tmp_path):
    model, batch = two_adapters("llama"), inputs("llama", batch=2)
    theirs = peft_model(model, "llama", tmp_path)
    merge_lora(set_adapter(model, "a"), unload=False)
    theirs.set_adapter("a"), theirs.merge_adapter()
    before = snapshot(model)
    with pytest.raises(ValueError, match="'a' is merged.*unmerge_lora"):
        mixed_forward(model, ["a", "b"], **batch)
    with pytest.raises(ValueError, match="merged"):
        theirs(**batch, adapter_names=["a", "b"])
    assert_unchanged(model, before)
    unmerge_lora(model)
    mixed_forward(model, ["a", "b"], **batch)


def test_a_plain_lora_model_serves_default_and_base_rows():
    from peftkit.lora import add_lora
    model, batch = add_lora(build("bert"), ["query"], modules_to_save=["classifier"]), inputs("bert")
    with pytest.raises(ValueError, match="classifier.*every row would share"):
        mixed_forward(model, ["default", BASE], **batch)  # the base rows would get the trained head
    model = add_lora(build("bert"), ["query"])
    torch.nn.init.ones_(model.bert.encoder.layer[0].attention.self.query.lora_B.weight)
    mixed = mixed_forward(model, ["default", BASE], **batch).logits
    torch.testing.assert_close(mixed[:1], model(**rows(batch, 0)).logits)
    torch.testing.assert_close(mixed[1:], build("bert")(**rows(batch, 1)).logits)


# --- what each adapter costs ---
@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_adapter_bytes_count_what_peft_holds_per_adapter(family, tmp_path):
    model = two_adapters(family)
    theirs = peft_model(model, family, tmp_path / "export")
    costs = adapter_bytes(model)
    assert list(costs) == ["a", "b", BASE]
    for name in ["a", "b"]:
        peft_params = [p for n, p in theirs.named_parameters() if "lora_" in n and f".{name}" in n.rsplit("lora_")[1]]
        assert costs[name]["parameters"] == sum(p.numel() for p in peft_params) > 0
        assert costs[name]["bytes"] == 4 * costs[name]["parameters"]  # float32 factors
    assert costs[BASE]["parameters"] == sum(p.numel() for p in build(family).parameters())
    theirs.save_pretrained(tmp_path / "peft")  # a subfolder per adapter not named "default"
    for name in ["a", "b"]:
        with safe_open(tmp_path / "peft" / name / "adapter_model.safetensors", "pt") as f:
            assert sum(f.get_tensor(k).nbytes for k in f.keys()) == costs[name]["bytes"]
    on_disk = adapter_bytes(tmp_path / "peft")
    assert {"a/adapter_model.safetensors", "b/adapter_model.safetensors"} <= set(on_disk["files"])
    assert on_disk["bytes"] == sum(on_disk["files"].values()) > costs["a"]["bytes"] + costs["b"]["bytes"]


def test_adapter_bytes_of_a_file_and_bad_paths(tmp_path):
    model = two_adapters("llama")
    path = save_adapter(set_adapter(model, "b"), tmp_path / "b.safetensors")
    assert adapter_bytes(path) == {"bytes": path.stat().st_size, "files": {"b.safetensors": path.stat().st_size}}
    assert path.stat().st_size > adapter_bytes(model)["b"]["bytes"]  # the tensors and a small header
    with pytest.raises(FileNotFoundError, match="does not exist"):
        adapter_bytes(tmp_path / "missing")
    with pytest.raises(TypeError, match="model with LoRA or a path"):
        adapter_bytes(3)


def test_latency_times_four_ways_and_leaves_the_model_as_it_was():
    model, batch = two_adapters("llama"), inputs("llama", batch=4)
    before = snapshot(model)
    timings = latency(model, NAMES, lambda: model(**batch), repeats=3, warmup=1)
    assert list(timings) == ["base", "unmerged", "merged", "mixed"]
    assert all(isinstance(t, float) and 0 < t < 10 for t in timings.values())
    assert_unchanged(model, before)  # the merged weights were put back bit for bit
    with pytest.raises(ValueError, match="repeats"):
        latency(model, NAMES, lambda: model(**batch), repeats=0)
    with pytest.raises(ValueError, match="no adapter named 'z'"):
        latency(model, ["z"], lambda: model(**batch))

    def fails_while_merged():
        if getattr(model.model.layers[0].self_attn.q_proj, "merged", False):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        latency(model, NAMES, fails_while_merged, repeats=1, warmup=0)
    assert_unchanged(model, before)  # a failure while merged restores W too


def test_latency_serves_the_four_ways_in_turns():
    """Round after round, base, unmerged, merged, mixed: load on a shared machine slows each alike."""
    model, batch = two_adapters("llama"), inputs("llama", batch=4)
    seen = []

    def call():
        layers = list(model.modules())
        seen.append("mixed" if any(isinstance(m, MixedLoRA) for m in layers) else
                    "merged" if any(getattr(m, "merged", False) for m in layers) else "other")
        model(**batch)

    latency(model, NAMES, call, repeats=2, warmup=1)
    assert seen == ["other", "other", "merged", "mixed"] * 3
