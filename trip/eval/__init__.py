"""Evaluation of generated videos: F-Consistency (CLIP), FVD (I3D) and FID (Inception).

`trip eval` (trip/eval/cli.py) runs them over directories of clips or latent shard sets;
`frechet.py` holds the mathematics, `features.py` / `fconsistency.py` the networks, all
loaded from local paths or URLs only.
"""
