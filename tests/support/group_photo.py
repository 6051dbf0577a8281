"""A generated group photo for the multi-face tests, composed from scikit-image's astronaut portrait.

Three heads on a smooth gradient (720×480): face 1 large on the left, face 2 mirrored at about a fifth of face 1's
box area in the middle (a bystander), face 3 cut by the right border (about 70 % of its FFHQ crop inside the
photo, both eyes visible). MTCNN finds exactly these three; the boxes below are where they are expected.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

HEIGHT, WIDTH = 480, 720
#: (scale, mirrored, x, y) of each pasted head, in reading order of the faces they contain
HEADS = ((1.4, False, 30, 90), (0.63, True, 330, 200), (1.0, False, 585, 100))
#: approximate face boxes (x0, y0, x1, y1) in reading order, ±12 px (measured with facenet-pytorch 2.5.3)
EXPECTED_BOXES = ((86, 147, 210, 305), (354, 228, 410, 297), (626, 138, 724, 256))


def astronaut() -> torch.Tensor:
    from skimage import data

    return torch.from_numpy(data.astronaut()).float() / 255.0


def _scaled(image: torch.Tensor, scale: float, mirrored: bool) -> torch.Tensor:
    x = F.interpolate(image.permute(2, 0, 1)[None], scale_factor=scale, mode="bilinear", antialias=True,
                      align_corners=False)[0].permute(1, 2, 0)
    return x.flip(1) if mirrored else x


def group_photo(heads=HEADS) -> torch.Tensor:
    """The group photo [480,720,3] float32 in [0,1] (deterministic)."""
    head = astronaut()[20:230, 140:310]
    yy, xx = torch.meshgrid(torch.linspace(0, 1, HEIGHT), torch.linspace(0, 1, WIDTH), indexing="ij")
    canvas = torch.stack([0.3 + 0.3 * xx, 0.4 + 0.2 * yy, 0.5 - 0.2 * xx], dim=-1)
    for scale, mirrored, x, y in heads:
        patch = _scaled(head, scale, mirrored)
        h, w = patch.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, WIDTH), min(y + h, HEIGHT)
        canvas[y0:y1, x0:x1] = patch[y0 - y:y1 - y, x0 - x:x1 - x]
    return canvas.clamp(0, 1).contiguous()


def box_close(box, expected, tol: float = 12.0) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(box, expected))
