"""kernels.cold_step: every layer's cold FFN of a decode step in one parallel region, handing layers over by flags."""

import numba
import pytest
import torch

from powerinfer.kernels import cpu
from powerinfer.kernels.cold_step import LINE, ColdStep
from powerinfer.kernels.sparse_ffn import masked_ffn_reference, quantize_rows_int8

D, THREADS = 67, 2


def _layers(n_layers, dtype, seed=0, density=0.3):
    """Per layer: a MaskedFFN over bundled rows (as the executor keeps CPU rows; int8: with row scales), x, mask
    and output buffers."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(n_layers):
        n_ff = 41 + 13 * i  # layers of different widths, as placements give
        bundle = torch.randn(n_ff, 3, D, generator=g) / D ** 0.5
        if dtype == torch.int8:
            rows, scales = zip(*(quantize_rows_int8(w) for w in bundle.unbind(1)))
            bundle, scales = torch.stack(rows, dim=1), torch.stack(scales, dim=1).unbind(1)
            op = cpu.MaskedFFN(*bundle.unbind(1), "relu", scales=scales)
        else:
            op = cpu.MaskedFFN(*bundle.to(dtype).unbind(1), "relu")
        mask = torch.rand(n_ff, generator=g) < (density if i != 1 else 0.0)  # layer 1: nothing active
        layers.append((op, torch.randn(1, D, generator=g), mask, torch.full((1, D), float("nan"))))
    return layers


def _scales(op):
    return None if op.scales[0] is None else [torch.from_numpy(s[::op.stride]) for s in op.scales]


@pytest.fixture
def threads():
    before = numba.get_num_threads()
    cpu.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))
    yield numba.get_num_threads()
    cpu.set_num_threads(before)


# column_split_max: never, the default (8 per thread: layers on either side of it), every layer
@pytest.mark.parametrize("column_split_max", [0, None, 10**6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_cold_step_equals_the_per_layer_calls_and_hands_every_layer_over(threads, dtype, column_split_max):
    layers = _layers(4, dtype)
    rows = [2, 0, 3, 1]  # a layer's flags need not be in layer order
    gpu_ready, cpu_ready = torch.zeros(5, LINE, dtype=torch.int32), torch.zeros(5, LINE, dtype=torch.int32)
    step = ColdStep([op for op, *_ in layers], *zip(*[(x, m, y) for _, x, m, y in layers]), rows, gpu_ready,
                    cpu_ready, column_split_max=column_split_max)
    if column_split_max is None:  # the layers fall on both sides of the default
        assert {int(m.sum()) <= step.column_split_max for _, _, m, _ in layers if m.any()} == {True, False}
    for round_ in range(3):  # the flags re-arm, the buffers are read afresh
        for _, x, mask, _ in layers:
            x.normal_(generator=torch.Generator().manual_seed(round_))
        gpu_ready[rows, 0] = 1
        cpu_ready.zero_()
        want = [masked_ffn_reference(x, *(torch.from_numpy(w[::op.stride]).view(dtype) for w in op.weights),
                                     mask, "relu", scales=_scales(op)) for op, x, mask, _ in layers]
        assert step() == sum(k for _, k in want)
        for (_, _, _, y), (y_want, _) in zip(layers, want):
            torch.testing.assert_close(y, y_want, rtol=1e-5, atol=1e-5)
        assert gpu_ready[:, 0].tolist() == [0] * 5  # re-armed for the next step
        assert cpu_ready[:, 0].tolist() == [1 if r in rows else 0 for r in range(5)]


def test_cold_step_gives_up_when_a_flag_never_comes(threads):
    """A GPU flag that never comes: the step returns (every thread's wait is bounded) and raises; the layer it
    waited for is never handed over."""
    layers = _layers(2, torch.float32)
    gpu_ready, cpu_ready = torch.zeros(2, LINE, dtype=torch.int32), torch.zeros(2, LINE, dtype=torch.int32)
    step = ColdStep([op for op, *_ in layers], *zip(*[(x, m, y) for _, x, m, y in layers]), [0, 1], gpu_ready,
                    cpu_ready, spin_limit=100_000)
    gpu_ready[0, 0] = 1  # layer 1's never comes
    with pytest.raises(RuntimeError, match="gave up waiting"):
        step()
    assert cpu_ready[1, 0] == 0


@pytest.mark.parametrize("column_split_max", [0, 10**6])
def test_cold_step_hands_over_every_layer_in_long_runs_of_empty_layers(threads, column_split_max):
    """Every layer meets at a barrier, empty ones too: without it a thread racing ahead through empty layers
    counted itself done for two layers before the others, and a layer's flags were handed over by the wrong
    thread or never."""
    layers = [_layers(2, torch.float32)[0] for _ in range(12)]
    for i, (_, _, mask, _) in enumerate(layers):
        if i % 4:
            mask.zero_()
    gpu_ready, cpu_ready = torch.zeros(12, LINE, dtype=torch.int32), torch.zeros(12, LINE, dtype=torch.int32)
    step = ColdStep([op for op, *_ in layers], *zip(*[(x, m, y) for _, x, m, y in layers]), range(12), gpu_ready,
                    cpu_ready, spin_limit=10_000_000, column_split_max=column_split_max)
    want = sum(int(m.sum()) for _, _, m, _ in layers)
    for _ in range(200):
        gpu_ready[:, 0] = 1
        cpu_ready.zero_()
        assert step() == want
        assert gpu_ready[:, 0].tolist() == [0] * 12 and cpu_ready[:, 0].tolist() == [1] * 12


def test_cold_step_refuses_what_it_cannot_run(threads):
    (op, x, mask, y), = _layers(1, torch.float32)
    flags = torch.zeros(1, LINE, dtype=torch.int32)
    with pytest.raises(ValueError, match="one x, mask"):
        ColdStep([op], [x], [mask], [], [0], flags, flags.clone())
    with pytest.raises(ValueError, match=r"\[1, 67\] float32"):
        ColdStep([op], [x.double()], [mask], [y], [0], flags, flags.clone())
    with pytest.raises(ValueError, match="flags must be"):
        ColdStep([op], [x], [mask], [y], [1], flags, flags.clone())
    with pytest.raises(ValueError, match="one layout, dtype"):
        ColdStep([op, _layers(1, torch.bfloat16)[0][0]], [x, x], [mask, mask], [y, y], [0, 0], flags, flags.clone())
    step = ColdStep([op], [x], [mask], [y], [0], flags, flags.clone(), threads=threads + 1)
    with pytest.raises(RuntimeError, match="threads"):
        step()

