"""A small fitted run shared by the eval, predict and embed tests (one fit per test module)."""

import pytest
from click.testing import CliRunner

from tests.train_fixtures import tiny_config
from vision_ft.cli import main
from vision_ft.train.loop import FitRun


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    # shifted test-time views: eval and predict must evaluate as fit did (the run's config.json)
    cfg = tiny_config(root, epochs=2, ema_decay=0.5, tta_shift=0.1)
    final = FitRun(cfg, progress=False).run()
    return root, cfg, final


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result
