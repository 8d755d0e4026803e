"""kernels/gpu/pull.py: the split of a token's CPU experts, the gather from host memory, the pulled sum.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (the "host memory" is then plain
CPU memory); with CUDA the experts are a read-only file map registered with CUDA, as a model's are.
The pulled sum is checked against kernels/ref.py on the pulled pairs only, bound as in test_moe.py
(float32 x, exact block weights: NSE 1e-10).
"""
import numpy as np
import pytest
import torch

from dslocal.kernels import ref
from dslocal.kernels.experts import ExpertTensors
from dslocal.kernels.gpu import moe
from dslocal.kernels.gpu.pull import HostRegistration, PullCount, PulledExperts, cpu_share
from dslocal.quant.ggml import GGMLType
from dslocal.quant.quantize import quantize

T_ = GGMLType
ON_CUDA = torch.cuda.is_available()
E, D, F = 8, 256, 96
NSE_F32 = 1e-10


@pytest.fixture(autouse=True)
def few_programs(monkeypatch):
    if not ON_CUDA:      # the interpreter's cost is per program
        monkeypatch.setattr(moe, "BLOCK_R", 128)


def experts_of(gate, up, down, rng, arrays=None) -> ExpertTensors:
    def q(rows, cols, t):
        return quantize(rng.standard_normal((E, rows, cols), dtype=np.float32) / np.float32(cols ** 0.5), t)
    mats = [q(F, D, gate), q(F, D, up), q(D, F, down)] if arrays is None else arrays
    return ExpertTensors(*mats, gate, up, down)


def mapped(ex: ExpertTensors, path) -> ExpertTensors:
    """The same experts as views of a read-only file map (what a model's experts are)."""
    with open(path, "wb") as f:
        for a in (ex.gate, ex.up, ex.down):
            f.write(a.tobytes())
    m = np.memmap(path, mode="r")
    at, mats = 0, []
    for a in (ex.gate, ex.up, ex.down):
        mats.append(m[at:at + a.nbytes].reshape(a.shape))
        at += a.nbytes
    return ExpertTensors(*mats, ex.gate_type, ex.up_type, ex.down_type)


def test_cpu_share_splits_the_last_cpu_experts():
    ids = torch.tensor([[5, -1, 2, 7, -1, 3], [-1, -1, 4, -1, -1, -1], [1, 2, 3, 4, 5, 6]])
    cpu, slot = cpu_share(ids, 2)
    assert cpu.tolist() == [[5, -1, 2, -1, -1, -1], [-1] * 6, [1, 2, 3, 4, -1, -1]]
    assert slot.tolist() == [[-1, -1, -1, 1, -1, 0], [-1, -1, 0, -1, -1, -1], [-1, -1, -1, -1, 1, 0]]
    assert torch.equal(cpu_share(ids, 0)[0], ids)


def pulled_reference(x, cpu_ids, w, n, ex):
    """ref.moe_ffn over the pulled pairs only (the others: expert 0, weight 0)."""
    _, slot = cpu_share(torch.from_numpy(cpu_ids), n)
    on = slot.numpy() >= 0
    return ref.moe_ffn(x, np.where(on, cpu_ids, 0), np.where(on, w, 0).astype(np.float32), ex)


def nse(y, want) -> float:
    y, want = np.asarray(y, np.float64), np.asarray(want, np.float64)
    num, den = ((y - want) ** 2).sum(), (want ** 2).sum()
    return float(num / den) if den else (0.0 if num == 0 else float("inf"))


@pytest.mark.parametrize("types", [(T_.Q4_K, T_.Q4_K, T_.Q5_0), (T_.Q6_K, T_.Q8_0, T_.Q4_0)])
def test_pulled_sum_matches_reference(types, device, tmp_path):
    rng = np.random.default_rng(int(types[0]))
    ex = experts_of(*types, rng)
    slots = 3
    staging = torch.zeros(PulledExperts.staging_bytes(ex, slots) + 64, dtype=torch.uint8, device=device)
    registration = None
    if ON_CUDA:         # the GPU reads the experts from host memory, as a model's from its file map
        ex = mapped(ex, tmp_path / "experts.bin")
        registration = HostRegistration([ex.gate, ex.up, ex.down])
    count = PullCount(2, slots, torch.device(device))
    pulled = PulledExperts(ex, count, staging, registration)
    # the count is read on the device at each call: the same object serves every count up to its slots
    cases = [(2, [3, -1, 0, 6, 1, -1]), (2, [-1, -1, -1, 4, -1, -1]), (2, [-1] * 6), (2, [7, 2]),
             (3, [3, -1, 0, 6, 1, -1]), (1, [3, -1, 0, 6, 1, -1]), (0, [3, -1, 0, 6, 1, -1])]
    for n, ids in cases:
        count.set(n)
        K = len(ids)
        cpu_ids = np.array([ids], np.int64)
        w = rng.random((1, K), dtype=np.float32)
        x = rng.standard_normal((1, D), dtype=np.float32)
        y = pulled(torch.from_numpy(x).to(device), torch.from_numpy(cpu_ids).to(device),
                   torch.from_numpy(w).to(device))
        want = pulled_reference(x, cpu_ids, w, n, ex)
        _, slot = cpu_share(torch.from_numpy(cpu_ids), n)
        for k in range(K):          # each pulled expert's blocks were staged in its slot
            s = int(slot[0, k])
            if s >= 0:
                assert torch.equal(pulled.staged.gate[s].cpu(), torch.from_numpy(ex.gate[ids[k]]))
                assert torch.equal(pulled.staged.down[s].cpu(), torch.from_numpy(ex.down[ids[k]]))
        err = nse(y.cpu(), want)
        print(f"{[t.name for t in types]} n {n} ids {ids}: NSE {err:.2e}")
        assert err < NSE_F32, f"ids {ids}: NSE {err:.2e}"
        base = torch.from_numpy(rng.standard_normal((1, D), dtype=np.float32)).to(device)
        into = base.clone()       # the layer's sum so far: the pulled share is added to it
        assert pulled(torch.from_numpy(x).to(device), torch.from_numpy(cpu_ids).to(device),
                      torch.from_numpy(w).to(device), out=into) is into
        assert torch.equal(into, y + base)


def test_registration_refuses_to_pin_most_of_the_ram(monkeypatch, tmp_path):
    """Checked before CUDA is asked, so this runs without a GPU too."""
    from dslocal.kernels.gpu import pull
    ex = mapped(experts_of(T_.Q4_K, T_.Q4_K, T_.Q5_0, np.random.default_rng(3)), tmp_path / "experts.bin")
    small = type("Memory", (), {"total": ex.gate.nbytes})()
    monkeypatch.setattr(pull.psutil, "virtual_memory", lambda: small)
    with pytest.raises(RuntimeError, match="would pin more than 80% of the"):
        HostRegistration([ex.gate, ex.up, ex.down])


def test_rejects_what_it_cannot_pull(device):
    rng = np.random.default_rng(1)
    staging = torch.zeros(1 << 20, dtype=torch.uint8, device=device)
    ex = experts_of(T_.Q4_K, T_.Q4_K, T_.F16, rng)
    with pytest.raises(ValueError, match="cannot read F16"):
        PulledExperts(ex, PullCount(2, 2, torch.device(device)), staging, None)
    ex = experts_of(T_.Q4_K, T_.Q4_K, T_.Q5_0, rng)
    with pytest.raises(ValueError, match="1 to 16"):
        PullCount(0, 0, torch.device(device))
    with pytest.raises(ValueError, match="must be 0 to 2"):
        PullCount(3, 2, torch.device(device))


@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU (host memory registered with CUDA)")
def test_registration_ends_and_can_be_made_again(tmp_path):
    rng = np.random.default_rng(2)
    ex = mapped(experts_of(T_.Q4_K, T_.Q4_K, T_.Q5_0, rng), tmp_path / "experts.bin")
    registration = HostRegistration([ex.gate, ex.up, ex.down, ex.gate[2:4]])    # overlapping pages: one range
    assert registration.nbytes >= ex.gate.nbytes + ex.up.nbytes + ex.down.nbytes
    HostRegistration([ex.down, ex.up, ex.gate]).close()     # the same range: shared, still registered
    with pytest.raises(RuntimeError, match="could not register"):
        HostRegistration([ex.up])                   # part of a registered range
    registration.close()
    HostRegistration([ex.up]).close()
    x = torch.ones(3, device="cuda")
    assert x.cpu().tolist() == [1.0, 1.0, 1.0]      # device -> host copies still work
