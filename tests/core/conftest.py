"""Models shared by the whole-photo tests: the tiny SD1.5-shaped checkpoint through DiffusersBackend and a
random-weight FaceNet, built once per session."""
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def pipeline_files(tmp_path_factory):
    from tests.support import tiny_diffusers as td

    tok = td.require_sd1_tokenizer_dir()
    folder = tmp_path_factory.mktemp("pipeline")
    sys.path.insert(0, str(REPO / "scripts"))
    import make_tiny_sd15
    facenet = make_tiny_sd15.make_random_facenet(folder / "20180402-114759-vggface2.pt")
    checkpoint = td.tiny_checkpoint(str(folder), 0, vae="taesd", text_layers=2)
    from skimage import data
    photo = folder / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    return {"tokenizer": tok, "checkpoint": checkpoint, "facenet": str(facenet), "photo": str(photo), "dir": folder}


@pytest.fixture(scope="session")
def pipeline_models(pipeline_files):
    from core.diffusers_backend import DiffusersBackend
    from core.recognizers import load_recognizer

    return (DiffusersBackend.from_single_file(pipeline_files["checkpoint"], tokenizer_dir=pipeline_files["tokenizer"]),
            load_recognizer(pipeline_files["facenet"], "auto"))
