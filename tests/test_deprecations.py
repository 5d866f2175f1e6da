import logging
import os
import warnings

import pytest
from deprecations import upstream_deprecations

pytestmark = pytest.mark.upstream_deprecations_expected


def test_upstream_deprecations_are_caught_from_both_channels():
    with upstream_deprecations() as found:
        logging.getLogger("transformers.modeling_utils").warning("`foo` is deprecated; use `bar`.")
        logging.getLogger("transformers.modeling_utils").warning("unrelated warning")
        warnings.warn_explicit("old argument", FutureWarning, os.path.join("site", "peft", "tuners.py"), 3)
        warnings.warn_explicit("old call", DeprecationWarning, os.path.join("src", "leanvlm", "train.py"), 5)
    assert len(found) == 3
    assert "`foo` is deprecated" in found[0] and "peft" in found[1] and "leanvlm" in found[2]


def test_other_packages_warnings_pass_through():
    with pytest.warns(DeprecationWarning, match="internal"), upstream_deprecations() as found:
        warnings.warn_explicit("internal", DeprecationWarning, os.path.join("site", "matplotlib", "a.py"), 1)
    assert found == []
