"""make_clipper: every method built from a name and options, every option checked once for all entry points."""

import math

import pytest

from lightning_gradguard.core.clip import CLIPPERS, check_clip_options, make_clipper
from lightning_gradguard.core.clip._options import CLIP_OPTION_DEFAULTS


@pytest.mark.parametrize(
    ("method", "options", "attrs"),
    [
        ("zscore", {"z_threshold": 3, "clip_to": "mean", "norm_type": math.inf}, {"z_threshold": 3.0, "to_mean": True}),
        ("percentile", {"percentile": 90, "window": 64}, {"norm_type": 2.0}),
        ("agc", {"clipping": 0.05, "exclude": ["head"]}, {"clipping": 0.05, "exclude": ("head",)}),
        ("norm", {"max_norm": 0.5, "norm_type": 1}, {"max_norm": 0.5, "norm_type": 1.0}),
        ("value", {"clip_value": 0.1}, {"clip_value": 0.1}),
        ("per_parameter", {"max_norm": 2.0}, {"max_norm": 2.0}),
    ],
)
def test_make_clipper_builds_the_method_with_its_options(method, options, attrs):
    clipper = make_clipper(method, **options)
    assert type(clipper) is CLIPPERS[method]
    assert {k: getattr(clipper, k) for k in attrs} == attrs
    if "norm_type" in options:
        assert clipper.norm_type == float(options["norm_type"])


@pytest.mark.parametrize("method", list(CLIPPERS))
def test_every_option_at_its_default_is_accepted_by_every_method(method):
    assert type(make_clipper(method, **CLIP_OPTION_DEFAULTS)) is CLIPPERS[method]


def test_errors_name_the_owner_option_and_value():
    with pytest.raises(ValueError, match=r"^Owner: method must be one of .*got 'autoclip'$"):
        make_clipper("autoclip", owner="Owner")
    with pytest.raises(TypeError, match=r"^Owner: 'zthreshold' is not a clipping option; the options are z_thresh"):
        check_clip_options("zscore", owner="Owner", zthreshold=3.0)
    with pytest.raises(ValueError, match=r"^window must be an int >= 2 and <= 1000000, got 1$"):
        make_clipper("percentile", window=1)
    with pytest.raises(ValueError, match=r"^Owner: eps=0.1 is not used by method='norm'; it applies to method 'agc'"):
        make_clipper("norm", owner="Owner", eps=0.1)
