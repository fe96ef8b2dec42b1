import mmap
import sys

from edgeprune.profiles import memory


def test_rss_sampler_sees_an_allocation():
    size = 64 * 1024 * 1024
    with memory.RssSampler() as sampler:
        before = memory.rss_bytes()
        # a fresh anonymous mapping: new pages, unlike malloc, which may reuse memory freed earlier
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):  # touch every page
            block[offset] = 1
    assert sampler.peak >= before + 60 * 1024 * 1024
    block.close()


def test_missing_nvml_and_tegrastats_are_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    result = memory.gpu_memory()
    assert not result.available and "not installed" in result.reason
    monkeypatch.setattr(memory.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "jtop", None)
    result = memory.jetson_memory()
    assert not result.available and "not a Jetson" in result.reason


def test_parse_tegrastats_line():
    line = "RAM 2345/7620MB (lfb 12x4MB) SWAP 0/3810MB CPU [5%@1510,3%@1510] GR3D_FREQ 0%"
    result = memory.parse_tegrastats(line)
    assert result.available and result.used_bytes == 2345 * 1024**2 and result.total_bytes == 7620 * 1024**2
    assert not memory.parse_tegrastats("garbage").available
