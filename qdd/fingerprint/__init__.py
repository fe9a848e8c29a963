"""Spectral fingerprints: where in frequency a precision changes the images' noise residual.

`spectra`: the numerics (luma, residual filter, power spectrum, radial profile, distance
and its jackknife interval);
`module`: the Lightning loop that accumulates them exactly once over workers and ranks;
`command`: ``qdd-cli fingerprint`` and the files it writes.
"""

#: ``kind`` in metrics.json that marks a fingerprint run (`qdd-cli report` reads it).
KIND = "fingerprint"
#: The run folder's files (besides metrics.json).
SPECTRA = "spectra.npz"
DISTANCES = "spectral_distance.csv"
DISTANCE_COLUMNS = (
    "generator", "precision", "perturbation", "n", "distance", "low", "high", "distance_plugin",
)  # fmt: skip
