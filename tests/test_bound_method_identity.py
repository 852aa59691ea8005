"""A network wrapped by a bound method (wrap_model(net.forward), wrap_model(net.denoise)) is identified by the
weights of the module the method belongs to.  It was identified by the method's name ("forward"), with a warning
saying the model had no weights: a teacher cache made with one network was reused for another with other weights."""
import warnings

import torch

import ld3_ext
from ld3_ext.training.teacher import model_identity


class _Net(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x, sigma):
        return self.w * x / (1 + sigma.reshape(-1, 1) ** 2)

    def denoise(self, x, sigma):
        return self.forward(x, sigma)


def _wrap(fn):
    return ld3_ext.wrap_model(fn, ld3_ext.EDM(), prediction="x0", time_input="sigma")


def test_bound_method_is_identified_by_its_networks_weights():
    a, b = _Net(0.9), _Net(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the model has no weights to hash" warning
        ia, ib = model_identity(_wrap(a.forward)), model_identity(_wrap(b.forward))
        ia2 = model_identity(_wrap(a.denoise))
    assert ia["hash_source"] == "state_dict"
    assert ia["weights_hash"] != ib["weights_hash"]
    assert ia2["weights_hash"] == ia["weights_hash"]


def test_teacher_cache_of_another_network_is_refused(tmp_path):
    from ld3_ext.training.teacher import TeacherCacheMismatch
    a, b = _Net(0.9), _Net(0.1)
    kw = dict(sample_shape=(3,), n_train=2, n_valid=2, teacher_nfe=4, progress=False, teacher_cache=str(tmp_path))
    ld3_ext.LD3Trainer(_wrap(a.forward), ld3_ext.EDM(), "dpmpp", nfe=3, **kw).generate_teacher()
    tr = ld3_ext.LD3Trainer(_wrap(b.forward), ld3_ext.EDM(), "dpmpp", nfe=3, **kw)
    try:
        tr.generate_teacher()
    except TeacherCacheMismatch as e:
        assert "weights_hash" in str(e)
    else:
        raise AssertionError("the cache made with another network's weights was reused")
