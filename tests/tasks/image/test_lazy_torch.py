"""The image task's config and data checks run without importing torch (the launcher's pre-run)."""

import subprocess
import sys

from tasks.image.models import MODELS
from tasks.image.task import MODEL_NAMES


def test_the_task_s_model_names_are_the_models_it_can_build():
    assert set(MODEL_NAMES) == set(MODELS)


def test_config_and_data_checks_do_not_import_torch():
    # Prepare: a fresh interpreter, so nothing of this test process is already imported
    probe = (
        "import sys\n"
        "from fl_server.experiments.config import compose_config\n"
        "from fl_server.runtime.launch import preflight\n"
        "preflight(compose_config(['clients.num=2']))\n"
        "print('torch' in sys.modules)\n"
    )
    # Execute
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    # Assert
    assert result.stdout.strip().splitlines()[-1] == "False"
