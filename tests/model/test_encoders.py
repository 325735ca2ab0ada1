"""SAM2 / DINOv2 building, strict checkpoint loading, checkpoint paths, and the download script."""
from __future__ import annotations

import hashlib
import http.server
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

from model import catalog
from model import checkpoints
from model.checkpoints import CheckpointError
from model.dino import DINO_MODELS, build_dino, dino_patch_tokens
from model.preprocess import imagenet_normalize
from model.proposals import encode_image
from model.sam import SAM_MODELS, build_sam

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import download_checkpoints as fetch  # noqa: E402  (scripts/download_checkpoints.py)
from download_checkpoints import DownloadError  # noqa: E402


def meta_dinov2_state_dict(size: str = "s", img: int = 518, patch: int = 14, registers: int = 0) -> dict:
    """Random state dict in Meta's dinov2_vit*14_pretrain.pth layout."""
    D, depth = {"s": (384, 12), "b": (768, 12)}[size]
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"cls_token": r(1, 1, D), "pos_embed": r(1, (img // patch) ** 2 + 1, D),
          "mask_token": torch.zeros(1, D), "patch_embed.proj.weight": r(D, 3, patch, patch),
          "patch_embed.proj.bias": r(D), "norm.weight": 1 + r(D), "norm.bias": r(D)}
    if registers:
        sd["register_tokens"] = r(1, registers, D)
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(D), p + "norm1.bias": r(D),
                   p + "attn.qkv.weight": r(3 * D, D), p + "attn.qkv.bias": r(3 * D),
                   p + "attn.proj.weight": r(D, D), p + "attn.proj.bias": r(D), p + "ls1.gamma": r(D),
                   p + "norm2.weight": 1 + r(D), p + "norm2.bias": r(D),
                   p + "mlp.fc1.weight": r(4 * D, D), p + "mlp.fc1.bias": r(4 * D),
                   p + "mlp.fc2.weight": r(D, 4 * D), p + "mlp.fc2.bias": r(D), p + "ls2.gamma": r(D)})
    return sd


def assert_one_line(error: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


# ------------------------------------------------------------------ names and tables
def test_model_tables_map_names_to_official_configs_and_files():
    assert SAM_MODELS["sam2-l"] == ("configs/sam2/sam2_hiera_l.yaml", "sam2_hiera_large.pt")
    assert SAM_MODELS["sam2-b+"] == ("configs/sam2/sam2_hiera_b+.yaml", "sam2_hiera_base_plus.pt")
    assert SAM_MODELS["sam2.1-t"] == ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt")
    assert len(SAM_MODELS) == 8
    assert DINO_MODELS["dinov2-l"] == ("vit_large_patch14_dinov2.lvd142m", "dinov2_vitl14_pretrain.pth")
    assert DINO_MODELS["dinov2-g"][1] == "dinov2_vitg14_pretrain.pth"


def test_official_urls():
    assert catalog.checkpoint_url("sam2-l") == \
        "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_large.pt"
    assert catalog.checkpoint_url("sam2.1-b+") == \
        "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_base_plus.pt"
    assert catalog.checkpoint_url("dinov2-l") == \
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
    assert catalog.checkpoint_url("dinov2-g") == \
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_pretrain.pth"
    with pytest.raises(ValueError, match="unknown model"):
        catalog.checkpoint_url("sam3-l")


def test_default_checkpoint_dir_follows_model_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MODEL_DIR", raising=False)
    assert checkpoints.default_checkpoint_dir() == Path("checkpoints")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    assert checkpoints.default_checkpoint_dir() == tmp_path / "checkpoints"
    assert checkpoints.default_checkpoint_path("dinov2-s") == tmp_path / "checkpoints" / "dinov2_vits14_pretrain.pth"


# ------------------------------------------------------------------ SAM2
def test_build_sam_random_small(sam_t):
    assert type(sam_t).__name__ == "SAM2Base"
    assert sam_t.image_size == 256 and not sam_t.training
    assert sam_t.device == torch.device("cpu")
    assert {p.dtype for p in sam_t.parameters()} == {torch.float32}
    state = encode_image(sam_t, torch.rand(1, 3, 256, 256))
    assert state.image_embed.shape == (1, 256, 16, 16)
    assert [tuple(f.shape) for f in state.high_res_feats] == [(1, 32, 64, 64), (1, 64, 32, 32)]


def test_encode_image_omits_no_mem_embed(sam_t):
    x = torch.rand(1, 3, 256, 256)
    state = encode_image(sam_t, x)
    with torch.inference_mode():
        plain = sam_t.forward_image(imagenet_normalize(x))["vision_features"]
    assert sam_t.directly_add_no_mem_embed and sam_t.no_mem_embed.abs().sum() > 0
    assert torch.equal(state.image_embed, plain)


def test_build_sam_needs_exactly_one_weight_source():
    with pytest.raises(ValueError, match="random_weights=True"):
        build_sam("sam2-t")
    with pytest.raises(ValueError, match="not both"):
        build_sam("sam2-t", "x.pt", random_weights=True)
    with pytest.raises(ValueError, match="unknown SAM2 model"):
        build_sam("sam2-xl", random_weights=True)


def test_sam_checkpoint_round_trip(sam_t, sam_t_checkpoint):
    loaded = build_sam("sam2.1-t", sam_t_checkpoint, device="cpu", image_size=256)
    ref = sam_t.state_dict()
    got = loaded.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_sam_checkpoint_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError) as e:
        build_sam("sam2-l", path, device="cpu", image_size=256)
    assert_one_line(e, str(path), "sam2-l", "not found")


def test_sam_checkpoint_truncated(sam_t_checkpoint, tmp_path):
    data = Path(sam_t_checkpoint).read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        build_sam("sam2.1-t", path, device="cpu", image_size=256)
    assert_one_line(e, str(path), "sam2.1-t", "truncated or corrupt")


def test_sam_checkpoint_without_model_key(sam_t, tmp_path):
    path = tmp_path / "raw.pt"
    torch.save(sam_t.state_dict(), path)  # a bare state dict, not {'model': ...}
    with pytest.raises(CheckpointError) as e:
        build_sam("sam2.1-t", path, device="cpu", image_size=256)
    assert_one_line(e, str(path), "sam2.1-t", "no 'model' entry")


def test_sam_checkpoint_of_other_version(sam_t_checkpoint):
    # SAM 2.1 adds exactly 3 tensors to SAM 2.0
    with pytest.raises(CheckpointError) as e:
        build_sam("sam2-t", sam_t_checkpoint, device="cpu", image_size=256)
    assert_one_line(e, f"checkpoint {sam_t_checkpoint} does not match sam2-t "
                       f"(configs/sam2/sam2_hiera_t.yaml): 0 missing keys, 3 unexpected keys")


def test_sam_checkpoint_of_other_size(sam_t_checkpoint):
    with pytest.raises(CheckpointError) as e:
        build_sam("sam2.1-s", sam_t_checkpoint, device="cpu", image_size=256)
    message = assert_one_line(e, sam_t_checkpoint, "does not match sam2.1-s (configs/sam2.1/sam2.1_hiera_s.yaml)")
    assert "missing keys" in message and "shape mismatches" in message


# ------------------------------------------------------------------ DINOv2
def test_build_dino_random_and_patch_tokens(dino_s):
    assert dino_s.embed_dim == 384 and not dino_s.training and dino_s.num_prefix_tokens == 1
    x = torch.randn(2, 3, 112, 126)  # any size divisible by 14
    with torch.inference_mode():
        tokens = dino_patch_tokens(dino_s, x)
        # timm's independent path to the final-norm patch map: (B, D, h, w)
        ref = dino_s.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]
    assert tokens.shape == (2, 8, 9, 384)
    torch.testing.assert_close(tokens, ref.permute(0, 2, 3, 1))


def test_build_dino_needs_exactly_one_weight_source():
    with pytest.raises(ValueError, match="random_weights=True"):
        build_dino("dinov2-s")
    with pytest.raises(ValueError, match="not both"):
        build_dino("dinov2-s", "x.pth", random_weights=True)
    with pytest.raises(ValueError, match="unknown DINOv2 model"):
        build_dino("dinov3-s", random_weights=True)


@pytest.fixture(scope="module")
def meta_s_file(tmp_path_factory) -> tuple[Path, dict]:
    sd = meta_dinov2_state_dict("s")
    path = tmp_path_factory.mktemp("dino") / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    return path, sd


def test_dino_meta_checkpoint_round_trip(meta_s_file):
    path, sd = meta_s_file
    model = build_dino("dinov2-s", path, device="cpu")
    got = model.state_dict()
    assert set(got) == set(sd) - {"mask_token"}
    assert all(torch.equal(got[k], sd[k]) for k in got)


def test_dino_checkpoint_missing_and_truncated(meta_s_file, tmp_path):
    with pytest.raises(CheckpointError) as e:
        build_dino("dinov2-l", tmp_path / "none.pth", device="cpu")
    assert_one_line(e, str(tmp_path / "none.pth"), "dinov2-l", "not found")
    data = meta_s_file[0].read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:4096])
    with pytest.raises(CheckpointError) as e:
        build_dino("dinov2-s", cut, device="cpu")
    assert_one_line(e, str(cut), "dinov2-s", "truncated or corrupt")


def test_dino_registers_checkpoint_is_rejected(tmp_path):
    # a *_reg4_pretrain.pth must not load partially into a no-register model
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(meta_dinov2_state_dict("s", registers=4), path)
    with pytest.raises(CheckpointError) as e:
        build_dino("dinov2-s", path, device="cpu")
    assert_one_line(e, f"checkpoint {path} does not match dinov2-s (vit_small_patch14_dinov2.lvd142m)",
                    "4 register tokens")


def test_dino_checkpoint_of_other_size(meta_s_file):
    with pytest.raises(CheckpointError) as e:
        build_dino("dinov2-b", meta_s_file[0], device="cpu")
    assert_one_line(e, str(meta_s_file[0]), "dinov2-b", "0 missing keys, 0 unexpected keys",
                    "shape mismatches")


def test_dino_rejects_sam_file_and_non_state_dict(sam_t_checkpoint, tmp_path):
    with pytest.raises(CheckpointError) as e:
        build_dino("dinov2-s", sam_t_checkpoint, device="cpu")
    assert_one_line(e, sam_t_checkpoint, "does not match dinov2-s", "missing keys")
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError) as e:
        build_dino("dinov2-s", path, device="cpu")
    assert_one_line(e, str(path), "not a state dict")


# ------------------------------------------------------------------ scripts/download_checkpoints.py
def test_verify_sha256_on_local_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"no time to train")
    digest = hashlib.sha256(b"no time to train").hexdigest()
    assert fetch.sha256_file(path) == digest
    fetch.verify_sha256(path, digest.upper())
    with pytest.raises(CheckpointError) as e:
        fetch.verify_sha256(path, "0" * 64)
    assert_one_line(e, str(path), digest)


def test_download_unreachable_url_says_what_to_do(tmp_path):
    with pytest.raises(DownloadError) as e:
        fetch.download("sam2-l", tmp_path, url="http://127.0.0.1:9/sam2_hiera_large.pt", timeout=5)
    assert_one_line(e, "cannot download sam2-l from http://127.0.0.1:9/sam2_hiera_large.pt",
                    str(tmp_path / "sam2_hiera_large.pt"), "MODEL_DIR")
    assert list(tmp_path.iterdir()) == []  # no .part left behind


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def local_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_streams_and_checks_sha256(local_server, tmp_path):
    served, base = local_server
    payload = bytes(range(256)) * 5000
    (served / "file.pt").write_bytes(payload)
    dest_dir = tmp_path / "dest"
    digest = hashlib.sha256(payload).hexdigest()
    path = fetch.download("sam2-t", dest_dir, digest, url=f"{base}/file.pt")
    assert path == dest_dir / "sam2_hiera_tiny.pt" and path.read_bytes() == payload
    assert sorted(p.name for p in dest_dir.iterdir()) == ["sam2_hiera_tiny.pt"]

    with pytest.raises(CheckpointError):
        fetch.download("sam2-s", dest_dir, "f" * 64, url=f"{base}/file.pt")
    assert sorted(p.name for p in dest_dir.iterdir()) == ["sam2_hiera_tiny.pt"]
    with pytest.raises(DownloadError, match="404"):
        fetch.download("sam2-s", dest_dir, digest, url=f"{base}/missing.pt")


def test_download_without_a_hash_verifies_by_loading(local_server, tmp_path, meta_s_file):
    served, base = local_server
    (served / "good.pth").write_bytes(meta_s_file[0].read_bytes())
    (served / "bad.pth").write_bytes(b"not a checkpoint")
    dest_dir = tmp_path / "dest"
    path = fetch.download("dinov2-s", dest_dir, url=f"{base}/good.pth")
    assert path.read_bytes() == meta_s_file[0].read_bytes()
    path.unlink()
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        fetch.download("dinov2-s", dest_dir, url=f"{base}/bad.pth")
    assert list(dest_dir.iterdir()) == []


def test_cli_help_and_unreachable_network(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fetch.main(["--help"])
    assert e.value.code == 0 and "--sam" in capsys.readouterr().out
    monkeypatch.setitem(catalog.SAM2_URL_DIRS, "sam2", "http://127.0.0.1:9/")
    (tmp_path / "dinov2_vitl14_pretrain.pth").write_bytes(b"present")
    assert fetch.main(["--sam", "sam2-l", "--dino", "dinov2-l", "--dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "dinov2_vitl14_pretrain.pth already present" in out
    assert "cannot download sam2-l from http://127.0.0.1:9/sam2_hiera_large.pt" in err
    assert str(tmp_path / "sam2_hiera_large.pt") in err


def test_random_weights_are_the_same_in_every_process_and_leave_the_callers_rng_alone():
    """Web process and workers of a test deployment build the same random model (same proposals
    everywhere), and building one does not consume the caller's random stream."""
    from model.dino import build_dino
    from model.sam import build_sam

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_dino("dinov2-s", random_weights=True, device="cpu")
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(7)
    b = build_dino("dinov2-s", random_weights=True, device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    s1 = build_sam("sam2.1-t", random_weights=True, device="cpu", image_size=256)
    torch.manual_seed(99)
    s2 = build_sam("sam2.1-t", random_weights=True, device="cpu", image_size=256)
    assert all(torch.equal(x, y) for x, y in zip(s1.state_dict().values(), s2.state_dict().values()))
