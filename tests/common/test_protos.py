import shutil

import pytest

from services.common import proto_build, protos


def test_generated_modules_define_the_v1_services():
    services = {name: [m.name for m in s.methods]
                for mod in (protos.vit_pb2, protos.vae_pb2, protos.llm_pb2)
                for name, s in mod.DESCRIPTOR.services_by_name.items()}
    assert services == {"ViTService": ["Encode"], "VAEService": ["Encode", "Decode"],
                        "LLMService": ["GenerateText", "GenerateImage", "DeleteSession"]}
    assert protos.service_name(protos.vit_pb2, "ViTService") == "bagel.v1.ViTService"
    # The LLM context items carry the very messages the ViT and VAE services return.
    image_item = protos.llm_pb2.ImageItem.DESCRIPTOR
    assert image_item.fields_by_name["vit"].message_type.full_name == "bagel.v1.ViTFeatures"
    assert image_item.fields_by_name["vae"].message_type.full_name == "bagel.v1.Latent"
    stream = protos.llm_pb2.DESCRIPTOR.services_by_name["LLMService"].methods_by_name["GenerateImage"]
    assert stream.server_streaming and not stream.client_streaming


def test_llm_params_cover_the_reference_parameters():
    fields = set(protos.llm_pb2.ImageParams.DESCRIPTOR.fields_by_name)
    assert {"width", "height", "cfg_text_scale", "cfg_img_scale", "cfg_interval_lo", "cfg_interval_hi",
            "cfg_renorm_min", "cfg_renorm_type", "timestep_shift", "num_timesteps", "seed", "noise"} <= fields
    assert {"max_new_tokens", "do_sample", "temperature", "top_p", "seed"} <= set(
        protos.llm_pb2.TextParams.DESCRIPTOR.fields_by_name)
    # Unset must be distinguishable from 0 so the server can apply the preset's default.
    assert protos.llm_pb2.ImageParams.DESCRIPTOR.fields_by_name["cfg_img_scale"].has_presence
    assert "think" in protos.llm_pb2.GenerateImageRequest.DESCRIPTOR.fields_by_name


def test_generation_is_stamped_and_redone_when_a_proto_changes(tmp_path):
    src = tmp_path / "proto"
    shutil.copytree(proto_build.PROTO_ROOT, src)
    out = tmp_path / "gen"
    assert proto_build.generate(src, out, package="pkg") is True
    assert proto_build.generate(src, out, package="pkg") is False  # up to date: nothing done
    vit = (out / "bagel" / "v1" / "vit_pb2.py").read_text()
    assert "from pkg.bagel.v1 import common_pb2" in vit and "\nfrom bagel.v1" not in vit

    common = src / "bagel" / "v1" / "common.proto"
    common.write_text(common.read_text().replace("message ImageSize {", "message ImageSize {\n  uint32 depth = 9;"))
    assert proto_build.generate(src, out, package="pkg") is True
    assert "depth" in (out / "bagel" / "v1" / "common_pb2.pyi").read_text()


def test_a_broken_proto_fails_generation_clearly(tmp_path):
    src = tmp_path / "proto"
    shutil.copytree(proto_build.PROTO_ROOT, src)
    (src / "bagel" / "v1" / "vit.proto").write_text('syntax = "proto3";\npackage bagel.v1;\nmessage {')
    with pytest.raises(proto_build.ProtoGenerationError, match="vit.proto"):
        proto_build.generate(src, tmp_path / "gen", package="pkg")


def test_generated_code_is_in_the_projects_namespace_and_current():
    assert protos.common_pb2.__name__ == "bagel_serve.proto.bagel.v1.common_pb2"
    assert proto_build.current()  # the install generated it from these very sources


def test_a_checkout_with_changed_protos_refuses_stale_code(tmp_path):
    """Importing never regenerates: a .proto edited since the install is an error saying to reinstall."""
    import subprocess
    import sys

    src = tmp_path / "proto"
    shutil.copytree(proto_build.PROTO_ROOT, src)
    common = src / "bagel" / "v1" / "common.proto"
    common.write_text(common.read_text() + "\nmessage Extra { uint32 x = 1; }\n")
    assert not proto_build.current(src)
    code = (f"import pathlib, services.common.proto_build as pb; pb.PROTO_ROOT = pathlib.Path({str(src)!r})\n"
            "import services.common.protos")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "reinstall" in out.stderr and "older than the .proto files" in out.stderr
    assert not (tmp_path / "gen").exists()
