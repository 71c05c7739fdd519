"""A smooth textured blob on the working grid: a stand-in brain for model tests."""

import numpy as np

GRID = (80, 96, 80)


def healthy_like(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 'brain' blob with texture on the working grid."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in GRID], indexing="ij")
    mask = x**2 / 0.8 + y**2 / 0.9 + z**2 / 0.7 < 1
    image = (0.6 + 0.2 * np.sin(8 * x) * np.cos(6 * y) + 0.02 * rng.standard_normal(GRID)) * mask
    return image.astype(np.float32), mask
