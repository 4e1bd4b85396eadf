"""sdruntime.noise against torch.randn / diffusers' randn_tensor (torch is the oracle here only)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sdruntime.noise import TorchGenerator, make_generator, randn_tensor  # noqa: E402

ATOL = 1e-6
SEEDS = [0, 1, 42, 2**31 + 5, 2**32 - 1]
SHAPES = [
    (1, 4, 8, 8),
    (2, 4, 12, 16),
    (1, 4, 64, 64),
    (1, 4, 3, 5),  # 60 elements: tail recomputed from 16 fresh uniforms
    (17,),
    (16,),
    (15,),  # < 16 elements: torch's double-precision path
    (2, 3),
    (1,),
    (),
    (0,),
]


def torch_randn(shape: tuple[int, ...], generator: torch.Generator) -> np.ndarray:
    return torch.randn(shape, generator=generator, dtype=torch.float32).numpy()


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    assert ours.dtype == np.float32
    if ref.size:
        assert np.abs(ours - ref).max() <= ATOL


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fresh_generator_matches_torch(seed: int, shape: tuple[int, ...]) -> None:
    ours = TorchGenerator(seed).randn(shape)
    ref = torch_randn(shape, torch.Generator("cpu").manual_seed(seed))
    assert_close(ours, ref)


@pytest.mark.parametrize("seed", SEEDS)
def test_successive_calls_keep_state_like_torch(seed: int) -> None:
    # Mixes multiple-of-16, ragged (tail redraw) and < 16 (cached double sample) calls.
    shapes = [(1, 4, 8, 8), (1, 4, 3, 5), (2, 4, 12, 16), (3,), (1,), (17,), (5,), (2, 2), (1, 4, 8, 8), ()]
    ours, ref = TorchGenerator(seed), torch.Generator("cpu").manual_seed(seed)
    for shape in shapes:
        assert_close(ours.randn(shape), torch_randn(shape, ref))


def test_small_path_is_exact() -> None:
    # torch computes < 16 elements in double precision, as we do: expect identical floats.
    ours, ref = TorchGenerator(7), torch.Generator("cpu").manual_seed(7)
    for shape in [(3,), (1,), (15,), ()]:
        np.testing.assert_array_equal(ours.randn(shape), torch_randn(shape, ref))


def test_large_latent_matches_torch() -> None:
    shape = (1, 4, 128, 128)
    gen = TorchGenerator(1234)
    assert_close(gen.randn(shape), torch_randn(shape, torch.Generator("cpu").manual_seed(1234)))


@pytest.mark.parametrize("seeds", [[3, 4], [0, 2**32 - 1, 42], [9]])
def test_randn_tensor_list_matches_diffusers(seeds: list[int]) -> None:
    diffusers_randn_tensor = pytest.importorskip("diffusers.utils.torch_utils").randn_tensor
    shape = (len(seeds), 4, 12, 16)
    ours_gens, ref_gens = make_generator(seeds), [torch.Generator("cpu").manual_seed(s) for s in seeds]
    for _ in range(2):  # second round checks each generator's state carried over
        ours = randn_tensor(shape, ours_gens)
        ref = diffusers_randn_tensor(shape, generator=ref_gens, dtype=torch.float32).numpy()
        assert_close(ours, ref)


def test_randn_tensor_single_generator_matches_diffusers() -> None:
    diffusers_randn_tensor = pytest.importorskip("diffusers.utils.torch_utils").randn_tensor
    shape = (2, 4, 8, 8)
    ours = randn_tensor(shape, make_generator(5))
    ref = diffusers_randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(5), dtype=torch.float32)
    assert_close(ours, ref.numpy())
    # A one-element list draws the whole batch from that generator, as in diffusers.
    assert_close(randn_tensor(shape, [TorchGenerator(5)]), ref.numpy())


def test_randn_tensor_list_length_must_match_batch() -> None:
    with pytest.raises(ValueError, match="batch size"):
        randn_tensor((3, 4, 8, 8), make_generator([1, 2]))


def test_randn_tensor_without_generator_is_fresh_noise() -> None:
    a, b = randn_tensor((2, 4, 8, 8), None), randn_tensor((2, 4, 8, 8), None)
    assert a.shape == (2, 4, 8, 8) and a.dtype == np.float32
    assert not np.array_equal(a, b)
    assert randn_tensor((2, 4, 8, 8), None, dtype=np.float16).dtype == np.float16


def test_make_generator() -> None:
    assert make_generator(None) is None
    gen = make_generator(np.int64(11))
    assert isinstance(gen, TorchGenerator) and gen.seed == 11
    gens = make_generator((1, 2))
    assert isinstance(gens, list) and [g.seed for g in gens] == [1, 2]


@pytest.mark.parametrize("seed", [2**32, 2**40 + 5, -1])
def test_seed_out_of_range_raises(seed: int) -> None:
    with pytest.raises(ValueError, match=r"2\*\*32"):
        TorchGenerator(seed)


def test_non_integer_seed_raises() -> None:
    with pytest.raises(TypeError):
        TorchGenerator(1.5)  # type: ignore[arg-type]


def test_noise_module_does_not_import_torch() -> None:
    code = "import sys; import sdruntime.noise; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
