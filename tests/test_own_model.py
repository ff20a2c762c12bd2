"""A consortium's own Flax NNX model: a package installed at every site registers it under
the `p2p_fl.models` entry points, the topology names it, and a federation trains it. The
package here is real files on PYTHONPATH (a module and its .dist-info), as pip would leave."""

import json

from processes import epochs_as_given, p2p_fl, small_dataset

PLUGIN = '''
import jax
from flax import nnx


class TinyNet(nnx.Module):
    """One conv layer and a linear head: the contract p2p_fl builds and calls."""

    def __init__(self, *, num_classes, in_channels, image_size, rngs):
        self.conv = nnx.Conv(in_channels, 8, kernel_size=(3, 3), strides=(2, 2), rngs=rngs)
        self.head = nnx.Linear(8, 1 if num_classes == 2 else num_classes, rngs=rngs)

    def __call__(self, x, *, train, rngs=None):
        return self.head(nnx.relu(self.conv(x)).mean(axis=(1, 2)))
'''


def install_plugin(root, version="1.0"):
    root.mkdir(parents=True)
    (root / "tinynet.py").write_text(PLUGIN)
    info = root / f"tinynet-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tinynet\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[p2p_fl.models]\ntiny-net = tinynet:TinyNet\n")
    return {"PYTHONPATH": str(root)}


def test_a_model_installed_at_the_sites_trains_in_a_federation(tmp_path):
    env = install_plugin(tmp_path / "site-packages")
    data = small_dataset(tmp_path / "small.npz", train=128, val=32, test=32)
    topology = tmp_path / "t.toml"
    topology.write_text(epochs_as_given('federation = "own-model"\nprotocol = "cwt"\n[training]\nmodel = "tiny-net"\nrounds = 1\n'
                        'batch_size = 32\n[data]\ndataset = "' + str(data) + '"\n'
                        '[[peers]]\nname = "a"\n[[peers]]\nname = "b"\n'))
    missing = p2p_fl("launch", str(topology), "--engine", "inproc", "--out", str(tmp_path / "none"), timeout=300)
    assert missing.returncode == 2 and "training.model 'tiny-net' is not one of" in missing.stderr
    assert "install its package at every site" in missing.stderr
    done = p2p_fl("launch", str(topology), "--out", str(tmp_path / "run"), timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "a" / "result.json").read_text())
    assert result["model"] == "tiny-net" and result["test_auc"] is not None


def test_the_fingerprint_names_another_version_of_the_model_package(tmp_path):
    from p2p_fl.config import parse_topology
    from p2p_fl.fingerprint import federation_fingerprint

    t = parse_topology({"federation": "f", "protocol": "cwt", "peers": [{"name": "a"}, {"name": "b"}]})
    spec = [("conv/kernel", "float32", (3, 3, 1, 8))]
    ours = federation_fingerprint(t, (28, 28, 1), 2, spec, "tinynet 1.0")
    assert ours.differing(federation_fingerprint(t, (28, 28, 1), 2, spec, "tinynet 1.1").field_digests) == ["model code"]
    wider = [("conv/kernel", "float32", (3, 3, 1, 16))]
    assert ours.differing(federation_fingerprint(t, (28, 28, 1), 2, wider, "tinynet 1.0").field_digests) == \
        ["model weights"]
