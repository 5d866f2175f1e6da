from typer.testing import CliRunner

import leanvlm
from leanvlm.cli import app


def test_info_lists_version_decoders_and_families():
    for args in ([], ["info"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert f"leanvlm {leanvlm.__version__}" in result.output
        assert "decoders: vanilla, himix, proxyv" in result.output
        assert "qwen3" in result.output
