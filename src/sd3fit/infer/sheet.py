"""A contact sheet: one row per prompt (and seed), one column per model, labelled, cells exactly the saved images."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

HEADER = 28  # pixels above the first row, for column labels
LABEL_WIDTH = 240  # pixels left of the first column, for the prompt and seed


def cell_box(row: int, col: int, width: int, height: int) -> tuple[int, int, int, int]:
    left, top = LABEL_WIDTH + col * width, HEADER + row * height
    return left, top, left + width, top + height


def contact_sheet(grid: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    width, height = grid[0][0].size
    sheet = Image.new("RGB", (LABEL_WIDTH + len(col_labels) * width, HEADER + len(row_labels) * height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for col, label in enumerate(col_labels):
        draw.text((LABEL_WIDTH + col * width + 4, 8), label[: max(8, width // 7)], fill="black", font=font)
    for row, label in enumerate(row_labels):
        lines = textwrap.wrap(label, width=(LABEL_WIDTH - 8) // 6)[: max(1, height // 12)]
        draw.multiline_text((4, HEADER + row * height + 4), "\n".join(lines), fill="black", font=font)
        for col, image in enumerate(grid[row]):
            sheet.paste(image.convert("RGB"), cell_box(row, col, width, height)[:2])
    return sheet
