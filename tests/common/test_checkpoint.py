"""Checkpoint layout (tiny on disk, 7B-MoT on the meta device) and strict loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from services.common.checkpoint import Checkpoint, CheckpointError, infer_ae_config
from services.common.config import AEConfig, preset
from services.dev.random_checkpoint import init_checkpoint
from services.llm.model import BagelLLM, load_llm
from services.vae.model import AutoEncoder, load_ae
from services.vit.model import SiglipVisionModel, load_vit


def published_ema_layout(layers=28, hidden=3584, heads=28, kv=4, d=128, inter=18944, vocab=152064, vit_layers=26,
                         vit_hidden=1152, vit_inter=4304) -> dict[str, tuple[int, ...]]:
    """The published ema.safetensors key names and shapes, written out from the reference's key list."""
    keys: dict[str, tuple[int, ...]] = {
        "language_model.model.embed_tokens.weight": (vocab, hidden),
        "language_model.model.norm.weight": (hidden,),
        "language_model.model.norm_moe_gen.weight": (hidden,),
        "language_model.lm_head.weight": (vocab, hidden),
        "connector.fc1.weight": (hidden, vit_hidden), "connector.fc1.bias": (hidden,),
        "connector.fc2.weight": (hidden, hidden), "connector.fc2.bias": (hidden,),
        "vit_pos_embed.pos_embed": (4900, hidden), "latent_pos_embed.pos_embed": (4096, hidden),
        "time_embedder.mlp.0.weight": (hidden, 256), "time_embedder.mlp.0.bias": (hidden,),
        "time_embedder.mlp.2.weight": (hidden, hidden), "time_embedder.mlp.2.bias": (hidden,),
        "vae2llm.weight": (hidden, 64), "vae2llm.bias": (hidden,),
        "llm2vae.weight": (64, hidden), "llm2vae.bias": (64,),
        "vit_model.vision_model.embeddings.patch_embedding.weight": (vit_hidden, 588),
        "vit_model.vision_model.embeddings.patch_embedding.bias": (vit_hidden,),
        "vit_model.vision_model.embeddings.position_embedding.weight": (4900, vit_hidden),
        "vit_model.vision_model.post_layernorm.weight": (vit_hidden,),
        "vit_model.vision_model.post_layernorm.bias": (vit_hidden,),
    }
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        for s in ("", "_moe_gen"):
            keys[f"{p}self_attn.q_proj{s}.weight"] = (heads * d, hidden)
            keys[f"{p}self_attn.q_proj{s}.bias"] = (heads * d,)
            for n in ("k", "v"):
                keys[f"{p}self_attn.{n}_proj{s}.weight"] = (kv * d, hidden)
                keys[f"{p}self_attn.{n}_proj{s}.bias"] = (kv * d,)
            keys[f"{p}self_attn.o_proj{s}.weight"] = (hidden, heads * d)
            keys[f"{p}self_attn.q_norm{s}.weight"] = (d,)
            keys[f"{p}self_attn.k_norm{s}.weight"] = (d,)
            mlp = "mlp" if not s else "mlp_moe_gen"
            keys[f"{p}{mlp}.gate_proj.weight"] = (inter, hidden)
            keys[f"{p}{mlp}.up_proj.weight"] = (inter, hidden)
            keys[f"{p}{mlp}.down_proj.weight"] = (hidden, inter)
            keys[f"{p}input_layernorm{s}.weight"] = (hidden,)
            keys[f"{p}post_attention_layernorm{s}.weight"] = (hidden,)
    for i in range(vit_layers):
        p = f"vit_model.vision_model.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[f"{p}self_attn.{n}.weight"] = (vit_hidden, vit_hidden)
            keys[f"{p}self_attn.{n}.bias"] = (vit_hidden,)
        for n in ("layer_norm1", "layer_norm2"):
            keys[f"{p}{n}.weight"] = (vit_hidden,)
            keys[f"{p}{n}.bias"] = (vit_hidden,)
        keys[f"{p}mlp.fc1.weight"], keys[f"{p}mlp.fc1.bias"] = (vit_inter, vit_hidden), (vit_inter,)
        keys[f"{p}mlp.fc2.weight"], keys[f"{p}mlp.fc2.bias"] = (vit_hidden, vit_inter), (vit_hidden,)
    return keys


def model_layout(cfg) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        llm = BagelLLM(cfg)
        vit = SiglipVisionModel(cfg.vit, cfg.vit_max_num_patch_per_side)
    out = {k: tuple(v.shape) for k, v in llm.state_dict().items()}
    out.update({"vit_model.vision_model." + k: tuple(v.shape) for k, v in vit.state_dict().items()})
    return out


def test_7b_mot_architecture_matches_published_layout_on_meta():
    got = model_layout(preset("bagel-7b-mot"))
    want = published_ema_layout()
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    # 7B-MoT: the LLM part has about 14B parameters (two copies of every layer but attention softmax).
    n_llm = sum(torch.Size(v).numel() for k, v in got.items() if k.startswith("language_model."))
    assert 14.0e9 < n_llm < 14.5e9


def test_7b_autoencoder_shapes_read_back_as_its_config():
    with torch.device("meta"):
        ae = AutoEncoder(AEConfig())
    shapes = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
    assert infer_ae_config(shapes) == AEConfig()
    assert shapes["encoder.conv_out.weight"] == (32, 512, 3, 3)


def test_tiny_checkpoint_has_official_file_set_and_layout(tiny_ckpt_dir):
    names = sorted(p.name for p in tiny_ckpt_dir.iterdir())
    assert names == sorted(["ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json",
                            "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"])
    cfg = preset("tiny")
    with safe_open(str(tiny_ckpt_dir / "ema.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.get_tensor("language_model.lm_head.weight").dtype == torch.bfloat16
    want = published_ema_layout(layers=cfg.llm.num_hidden_layers, hidden=cfg.llm.hidden_size,
                                heads=cfg.llm.num_attention_heads, kv=cfg.llm.num_key_value_heads,
                                d=cfg.llm.head_dim, inter=cfg.llm.intermediate_size, vit_layers=2,
                                vit_hidden=cfg.vit.hidden_size, vit_inter=cfg.vit.intermediate_size)
    want["vit_model.vision_model.embeddings.patch_embedding.weight"] = (cfg.vit.hidden_size, 588)
    assert shapes == want
    llm_json = json.loads((tiny_ckpt_dir / "llm_config.json").read_text())
    assert llm_json["model_type"] == "qwen2" and llm_json["num_key_value_heads"] == 2
    assert json.loads((tiny_ckpt_dir / "vit_config.json").read_text())["num_hidden_layers"] == 3


def test_sizes_come_from_the_checkpoint(tiny_ckpt):
    cfg = tiny_ckpt.config
    assert cfg == preset("tiny")
    assert cfg.max_latent_size == 64 and cfg.vit_max_num_patch_per_side == 70
    tok = tiny_ckpt.tokenizer()
    assert (tok.bos_id, tok.eos_id, tok.start_of_image_id, tok.end_of_image_id) == (151644, 151645, 151652, 151653)


def test_smaller_autoencoder_and_position_tables_load(tmp_path):
    """A checkpoint with other AE widths and smaller position tables loads with sizes read off its tensors."""
    from dataclasses import replace

    cfg = replace(preset("tiny"), ae=AEConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=2), max_latent_size=32,
                  vit_max_num_patch_per_side=40)
    init_checkpoint("tiny", tmp_path, cfg=cfg)
    ck = Checkpoint(tmp_path)
    assert ck.config.ae.ch_mult == (1, 2, 2, 4) and ck.config.ae.num_res_blocks == 2
    assert ck.config.max_latent_size == 32 and ck.config.vit_max_num_patch_per_side == 40
    ae = load_ae(ck)
    assert ae.encode(torch.zeros(3, 32, 32)).shape == (16, 4, 4)


def test_components_load_only_their_subset(tiny_ckpt):
    vit = load_vit(tiny_ckpt)
    assert not any(k.startswith("language_model") for k in vit.state_dict())
    llm = load_llm(tiny_ckpt)
    assert not any(k.startswith("vit_model") for k in llm.state_dict())
    stored = load_file(str(tiny_ckpt.dir / "ema.safetensors"))
    key = "language_model.model.layers.1.self_attn.k_proj_moe_gen.weight"
    assert torch.equal(llm.state_dict()[key], stored[key].float())


def _rewrite_ema(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "ema.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "ema.safetensors"))
    return Checkpoint(dst)


def test_strict_loading_names_missing_key(tiny_ckpt_dir, tmp_path):
    key = "language_model.model.layers.0.mlp_moe_gen.up_proj.weight"
    ck = _rewrite_ema(tiny_ckpt_dir, tmp_path / "c", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing key.*{key}"):
        load_llm(ck)
    load_vit(ck)  # the ViT's subset is intact and still loads


def test_strict_loading_names_unexpected_key(tiny_ckpt_dir, tmp_path):
    key = "language_model.model.layers.0.self_attn.extra.weight"
    ck = _rewrite_ema(tiny_ckpt_dir, tmp_path / "c", lambda t: t.__setitem__(key, torch.zeros(3)))
    with pytest.raises(CheckpointError, match=f"unexpected key.*{key}"):
        load_llm(ck)


def test_strict_loading_names_misshaped_key(tiny_ckpt_dir, tmp_path):
    key = "vit_model.vision_model.encoder.layers.1.mlp.fc1.weight"
    ck = _rewrite_ema(tiny_ckpt_dir, tmp_path / "c", lambda t: t.__setitem__(key, torch.zeros(5, 5)))
    with pytest.raises(CheckpointError, match=f"mis-shaped.*{key} is \\[5, 5\\]"):
        load_vit(ck)


def test_missing_file_and_ae_key_are_named(tiny_ckpt_dir, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(tiny_ckpt_dir, d)
    (d / "vit_config.json").unlink()
    with pytest.raises(CheckpointError, match="vit_config.json"):
        Checkpoint(d)
    shutil.copyfile(tiny_ckpt_dir / "vit_config.json", d / "vit_config.json")
    ae = load_file(str(d / "ae.safetensors"))
    ae.pop("decoder.conv_in.weight")
    save_file(ae, str(d / "ae.safetensors"))
    with pytest.raises(CheckpointError, match="decoder.conv_in.weight"):
        Checkpoint(d)


def test_tokenizer_with_wrong_special_ids_is_refused(tiny_ckpt_dir, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(tiny_ckpt_dir, d)
    data = json.loads((d / "tokenizer.json").read_text())
    for t in data["added_tokens"]:
        if t["content"] == "<|vision_start|>":
            t["content"] = "<|vision_begin|>"
    (d / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="vision_start"):
        Checkpoint(d).tokenizer()


def test_an_unknown_component_is_refused(tiny_ckpt):
    with pytest.raises(ValueError, match="unknown component 'vae'"):
        tiny_ckpt.load_weights(torch.nn.Linear(1, 1), "vae")
