"""awqtensor.memory: pages of mmapped weights are given back without changing a value."""

import platform
import re
import sys

import pytest
import torch

from awqtensor import memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and MADV_PAGEOUT are Linux's")
_kernel = tuple(int(v) for v in re.findall(r"\d+", platform.release())[:2])
pageout = pytest.mark.skipif(not sys.platform.startswith("linux") or _kernel < (5, 4),
                             reason="MADV_PAGEOUT needs Linux 5.4")


def _rss_file_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile")) / 1024


def _mapped(tmp_path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.randn(n, generator=torch.Generator().manual_seed(n))
    path = tmp_path / "weights.bin"
    path.write_bytes(values.numpy().tobytes())
    return torch.from_file(str(path), shared=False, size=n, dtype=torch.float32), values


@linux
def test_file_backed_picks_mapped_tensors_only(tmp_path):
    mapped, values = _mapped(tmp_path, 4096)
    found = memory.file_backed([values, mapped, torch.randn(8)])
    assert [t.data_ptr() for t in found] == [mapped.data_ptr()]


@pageout
def test_release_drops_pages_and_keeps_every_value(tmp_path):
    n = 16 * 2**20  # 64 MB, far above the page-granular noise of RssFile
    mapped, values = _mapped(tmp_path, n)
    mapped[:1024] *= 3  # written pages are copy-on-write: released they would lose this
    expected = values.clone()
    expected[:1024] *= 3
    assert torch.equal(mapped, expected)  # every page resident
    before = _rss_file_mb()
    released = memory.release_file_pages(memory.file_backed([mapped]))
    assert released > 0.9 * n * 4
    assert _rss_file_mb() < before - 32
    assert torch.equal(mapped, expected)  # faulted back in from the file, the written page kept


def test_release_ignores_anonymous_memory():
    t = torch.randn(1 << 16)
    kept = t.clone()
    assert memory.release_file_pages(memory.file_backed([t])) == 0
    assert torch.equal(t, kept)
