import json, torch, numpy as np
from pathlib import Path
from qdd.quality import run_quality
from qdd.quality.metrics import distribution_distances
from tests.test_quality import images_of, CPU
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
root = Path("/tmp/dbg3")
r = run_quality([str(root / "sd3-*")], "fp32", "/tmp/dbg5q", trainer=CPU, fid_weights="/tmp/ri.pth")
print("run", r.metrics["groups"]["sd3/fp4"]["fid"], r.metrics["groups"]["sd3/fp4"]["psnr"])
ext = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], "/tmp/ri.pth")
im = images_of(root); keys = sorted(k for g, p, k in im if p == "fp4")
f = lambda p: ext(torch.stack([torch.from_numpy(im["sd3", p, k]).permute(2, 0, 1) for k in keys]))[0].double().numpy()
a, b = f("fp4"), f("fp32")
print("direct", distribution_distances(a, b, "inception"), abs(a-b).max(), a.std(0).mean())
