"""Every test fails when the code it runs triggers a deprecation in transformers, accelerate or peft.

An upstream deprecation is the next release's breakage (transformers 5.24 renamed `past_key_values` to `cache` in
its output classes one release after warning about it), so it must fail a test here, not the demo on a user's
machine. A test that provokes deprecations on purpose is marked `upstream_deprecations_expected`.

The packaged parts are converted once per session into a cache of its own (never the user's), which tests share.
"""

from __future__ import annotations

import pytest
from deprecations import upstream_deprecations


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LEANVLM_CACHE", str(tmp_path_factory.mktemp("leanvlm-cache")))
        yield


@pytest.fixture(autouse=True)
def no_upstream_deprecations(request):
    with upstream_deprecations() as found:
        yield
    if found and request.node.get_closest_marker("upstream_deprecations_expected") is None:
        pytest.fail("deprecated upstream API used:\n" + "\n".join(dict.fromkeys(found)), pytrace=False)
