"""`p2p-fl export`: a finished site's model in files other tools read, without p2p_fl.

- model.safetensors: every weight by name (as `final_model.npz`), with the model's name,
  input shape, class names and decision threshold in the file's metadata. safetensors holds
  only tensors (no code, no pickle), so loading it runs nothing.
- model.jaxexport: the whole inference function (weights fixed in) serialized with
  `jax.export`: StableHLO, for any batch size; `jax.export.deserialize(bytes).call(images)`
  gives the probabilities `p2p-fl predict` gives, with JAX alone.
- model.json: what the two files hold and how to call them.

ONNX is left out: no maintained converter from JAX/Flax NNX to ONNX serves today
(jax2onnx is young; the TensorFlow route, jax2tf then tf2onnx, pulls TensorFlow in).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from p2p_fl.files import write_atomic, write_json
from p2p_fl.predict import load_site_model

FILES = ("model.safetensors", "model.jaxexport", "model.json")


def export_site_model(run: Path, out: Path) -> dict:
    """Writes FILES for the site model of `run` into `out`; returns model.json's content."""
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    learner, result = load_site_model(run)
    out.mkdir(parents=True, exist_ok=True)
    h, w, c = result["image_shape"]
    classes = result.get("classes") or [str(i) for i in range(result["num_classes"])]
    description = {
        "model": result["model"],
        "input": {"shape": ["N", h, w, c], "dtype": "float32", "range": [0.0, 1.0],
                  "layout": "NHWC; gray or RGB as channels says, resized bilinearly as p2p-fl reads images"},
        "classes": classes,
        "output": ("probability of class 1 (" + classes[1] + "), shape (N,)") if result["num_classes"] == 2
        else f"class probabilities, shape (N, {result['num_classes']})",
        "threshold": result.get("test_threshold"),  # chosen on the site's validation data
        "site": result.get("name"),
        "files": {"model.safetensors": "weights by name", "model.jaxexport": "jax.export serialized inference"},
    }
    weights = {k: np.ascontiguousarray(v) for k, v in learner.get_weights().items()}
    metadata = {k: json.dumps(v) for k, v in description.items() if k != "files"}
    write_atomic(out / "model.safetensors", lambda tmp: save_file(weights, str(tmp), metadata=metadata))
    batch = jax.export.symbolic_shape("n")[0]
    exported = jax.export.export(jax.jit(learner.inference_function()))(
        jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32))
    write_atomic(out / "model.jaxexport", lambda tmp: tmp.write_bytes(exported.serialize()))
    write_json(out / "model.json", description)
    return description
