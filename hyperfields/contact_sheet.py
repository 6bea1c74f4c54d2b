"""Contact sheets: rows of images on one white PNG, each row named at its left and each column group at the top."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

GAP = 2  # pixels between images
PAD = 4  # pixels around a label


def labelled_sheet(
    rows: list[list[list[Image.Image]]], row_labels: list[str], group_labels: list[str], gap: int = GAP
) -> Image.Image:
    """One image of `rows` (each a list of groups, each group a list of images of one size) with `row_labels` at the
    left and `group_labels` above the first image of each group."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width, height = rows[0][0][0].size
    text_height = max(draw.textbbox((0, 0), label, font=font)[3] for label in [*row_labels, *group_labels, "Ag"])
    left = max(int(draw.textlength(label, font=font)) for label in row_labels) + 2 * PAD
    top = text_height + 2 * PAD
    columns = max(sum(len(group) for group in row) for row in rows)
    sheet = Image.new("RGB", (left + columns * (width + gap), top + len(rows) * (height + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    x = left
    for label, group in zip(group_labels, rows[0]):
        draw.text((x, PAD), label, fill="black", font=font)
        x += len(group) * (width + gap)
    for r, (label, row) in enumerate(zip(row_labels, rows)):
        y = top + r * (height + gap)
        draw.text((PAD, y + (height - text_height) // 2), label, fill="black", font=font)
        images = [image for group in row for image in group]
        for c, image in enumerate(images):
            sheet.paste(image.convert("RGB"), (left + c * (width + gap), y))
    return sheet
