"""SimMatchV2's label lists, shipped beside SimMatch's (simmatch/splits/README.md).

Known answers from outside the files: their git blob ids are those of SimMatchV2's
`semi_files/split_1p_index.txt` / `split_10p_index.txt` (and of SimCLR's
`imagenet_subsets/1percent.txt` / `10percent.txt`), and their sizes are SimCLR's published
subset sizes (12,811 and 128,116 images, 1% and 10% of each class rounded)."""
from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from conftest import ROOT

LISTS = {  # name: (git blob id in the authors' repository, images, images per class)
    "1p": ("a41c9e9f271bf9467ea81e17e279cd9a2ece388b", 12_811, {12, 13}),
    "10p": ("1ca337e2a25273c022a7a955893ae6c2a6cb856c", 128_116, {128, 129}),
}


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.mark.parametrize("name", list(LISTS))
def test_simmatchv2_lists_are_the_authors_files(name):
    from simmatch.data.splits import read_list

    blob, images, per_class = LISTS[name]
    path = ROOT / "simmatch" / "splits" / "imagenet" / f"simmatchv2_split_{name}_index.txt"
    assert git_blob_id(path.read_bytes()) == blob
    entries = read_list(f"shipped:imagenet/simmatchv2_split_{name}_index.txt")
    counts = Counter(e.split("_")[0] for e in entries)
    assert len(entries) == len(set(entries)) == images
    assert len(counts) == 1000 and set(counts.values()) == per_class
    # another subset than SimMatch's (same sizes would have hidden a mix-up)
    simmatch = set(read_list(f"shipped:imagenet/simmatch_split_{name}_index.txt"))
    assert len(simmatch & set(entries)) == {"1p": 124, "10p": 13_063}[name]
