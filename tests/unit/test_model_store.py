"""Reading safetensors by hand: whole tensors and slices along any dimension, bit-exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tpm_faas.errors import ConfigError
from tpm_faas.runtime.model_store import read_tensor, weight_files


@pytest.fixture
def ckpt(tmp_path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(6, 5, generator=g),
        "b16": torch.randn(4, 3, 2, generator=g).to(torch.bfloat16),
        "v": torch.arange(7, dtype=torch.int64),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "extras.safetensors"))
    return tensors


def test_reads_whole_and_sliced(tmp_path: Path, ckpt: dict[str, torch.Tensor]) -> None:
    entries = weight_files(tmp_path)
    assert set(entries) == {"w", "b16", "v"}  # extras are not model weights
    for name, t in ckpt.items():
        assert torch.equal(read_tensor(entries[name]), t)
    assert torch.equal(read_tensor(entries["w"], 0, 2, 3), ckpt["w"][2:5])
    assert torch.equal(read_tensor(entries["w"], 1, 1, 3), ckpt["w"][:, 1:4])
    assert torch.equal(read_tensor(entries["b16"], 1, 2, 1), ckpt["b16"][:, 2:3])
    assert torch.equal(read_tensor(entries["b16"], 2, 1, 1), ckpt["b16"][:, :, 1:2])


def test_out_of_range_slice_is_refused(tmp_path: Path, ckpt: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ConfigError, match="outside"):
        read_tensor(weight_files(tmp_path)["w"], 1, 3, 4)


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ConfigError, match="not a safetensors"):
        weight_files(tmp_path)
