"""`pyhpc image`: import, push, pull, list, inspect, remove and prune images in the store."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

DEFAULT_STORE = "/var/lib/pyhpc/store"
DEFAULT_RUN_DIR = "/run/pyhpc"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("image", help="import, push, pull, list, inspect, remove images")
    p.add_argument(
        "--store",
        default=os.environ.get("PYHPC_STORE", DEFAULT_STORE),
        help=f"image store directory (default {DEFAULT_STORE}, or $PYHPC_STORE)",
    )
    p.add_argument(
        "--run-dir",
        default=DEFAULT_RUN_DIR,
        help="the driver's run_dir, to see which images running tasks use",
    )
    p.add_argument(
        "--level",
        type=int,
        default=3,
        choices=range(1, 23),
        metavar="1-22",
        help="zstd level of imported images (default 3; 1 fastest, 19 smallest)",
    )
    p.add_argument(
        "--registry-ca",
        metavar="PEM",
        help="CA certificate of the registry's TLS (default: the system's)",
    )
    acts = p.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    imp = acts.add_parser(
        "import",
        help="import an image into the store as SquashFS",
        description="REF: docker://HOST/REPO:TAG, oras://HOST/REPO:TAG, "
        "oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE, dir:ROOTFS "
        "or /path/image.sqsh",
    )
    imp.add_argument("ref", metavar="REF")
    imp.add_argument("--tag", help="also name the result with this reference")
    pull = acts.add_parser("pull", help="import again even if known (a tag may have moved)")
    pull.add_argument("ref", metavar="REF")
    push = acts.add_parser("push", help="push a stored image to a registry as an ORAS artifact")
    push.add_argument("image", metavar="IMAGE", help="stored reference or sha256 digest")
    push.add_argument("dest", metavar="oras://HOST/REPO:TAG")
    sign = acts.add_parser(
        "sign",
        help="sign an image with a key held in Vault's transit engine",
        description="Vault address and token from VAULT_ADDR and VAULT_TOKEN, as the Vault CLI. "
        "The signature (a DSSE envelope) is written beside the image as IMAGE.dsse.json.",
    )
    sign.add_argument("image", metavar="IMAGE", help="stored reference, sha256 digest or path")
    sign.add_argument("--key", required=True, help="transit key name")
    sign.add_argument("--transit", default="transit", help="transit mount (default transit)")
    verify = acts.add_parser(
        "verify", help="check an image's signature; exit 1 naming the failed check"
    )
    verify.add_argument("image", metavar="IMAGE", help="stored reference, sha256 digest or path")
    verify.add_argument("--key", action="append", required=True, help="trusted transit key")
    verify.add_argument("--transit", default="transit", help="transit mount (default transit)")
    acts.add_parser("ls", help="list stored images")
    ins = acts.add_parser("inspect", help="show an image's digests, source and config")
    ins.add_argument("image", metavar="IMAGE")
    rm = acts.add_parser("rm", help="remove a reference, and the image if nothing else uses it")
    rm.add_argument("images", nargs="+", metavar="IMAGE")
    prune = acts.add_parser("prune", help="delete unreferenced images not used by any task")
    prune.add_argument("--all", action="store_true", help="delete every image no task uses")


def _progress() -> Any:
    """Messages: one status line on a terminal, plain lines otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=0, bar_format="{desc}", file=sys.stderr, leave=False)
        return lambda message: bar.set_description_str(message)
    return lambda message: print(message, file=sys.stderr, flush=True)


def _meter() -> Any:
    """Bytes of each layer as they stream: a bar with size, rate and ETA on a terminal."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(label: str, done: int, total: int) -> None:
        bar = bars.get(label)
        if bar is None:
            bar = bars[label] = tqdm(
                total=total or None, desc=label, unit="B", unit_scale=True, file=sys.stderr
            )
        bar.update(done - bar.n)
        if total and done >= total:
            bar.close()

    return update


def _signing(args: argparse.Namespace, store: Any) -> int:
    from nomad_driver.signing.vault import Vault, VaultError
    from nomad_driver.signing.verify import SignatureError, Verifier, cache_dir, describe, sign

    found = store.lookup(args.image) if not args.image.startswith("/") else None
    path = found.path if found else os.path.abspath(args.image)
    reference = found.meta.get("source", args.image) if found else args.image
    if not os.path.isfile(path):
        print(
            f"pyhpc image: no image {args.image!r} (not in {args.store}, not a file)",
            file=sys.stderr,
        )
        return 1
    vault = Vault(transit=args.transit)
    try:
        if args.image_command == "sign":
            payload = sign(vault, path, reference, args.key)
            print(
                f"signed {payload.digest} with {payload.key} v{payload.key_version}: "
                f"{path}.dsse.json"
            )
        else:
            cache = cache_dir(args.run_dir)
            verified = Verifier(vault, tuple(args.key), cache).verify(path, reference)
            print(json.dumps(describe(verified)))
    except (SignatureError, VaultError) as err:
        print(f"pyhpc image {args.image_command}: {err}", file=sys.stderr)
        return 1
    return 0


def _registry(args: argparse.Namespace, text: str) -> dict[str, Any]:
    from nomad_driver.images import reference
    from nomad_driver.images.registry import Registry

    if not args.registry_ca:
        return {}
    ref = reference.parse(text)
    return {"registry": Registry(ref.registry, ca_file=args.registry_ca)} if ref.remote else {}


def run(args: argparse.Namespace) -> int:
    from nomad_driver.images import publish
    from nomad_driver.images.store import Store, StoreError
    from nomad_driver.runtime.imagemount import SharedImages, images_dir

    store = Store(args.store, level=args.level)
    shared = SharedImages(images_dir(args.run_dir))

    def in_use(digest: str) -> bool:
        return bool(shared.users(digest))

    try:
        if args.image_command in ("import", "pull"):
            action = store.ensure if args.image_command == "import" else store.pull
            image = action(args.ref, _progress(), _meter(), **_registry(args, args.ref))
            if getattr(args, "tag", None):
                store.tag(image.digest, args.tag)
            print(f"{image.digest}  {image.path}  {image.meta['size'] / 1e6:.1f} MB")
        elif args.image_command == "push":
            found = store.lookup(args.image)
            if found is None:
                print(f"pyhpc image: no image {args.image!r} in {args.store}", file=sys.stderr)
                return 1
            print(publish.push(found, args.dest, _progress(), **_registry(args, args.dest)))
        elif args.image_command in ("sign", "verify"):
            return _signing(args, store)
        elif args.image_command == "ls":
            refs: dict[str, list[str]] = {}
            for ref, digest in store.references().items():
                refs.setdefault(digest, []).append(ref)
            print(f"{'DIGEST':19}  {'SIZE':>9}  {'IN USE':6}  REFERENCES")
            for image in store.images():
                print(
                    f"{image.digest[:19]}  {image.meta['size'] / 1e6:7.1f}MB  "
                    f"{'yes' if in_use(image.digest) else 'no':6}  "
                    f"{', '.join(sorted(refs.get(image.digest, []))) or '-'}"
                )
        elif args.image_command == "inspect":
            found = store.lookup(args.image)
            if found is None:
                print(f"pyhpc image: no image {args.image!r} in {args.store}", file=sys.stderr)
                return 1
            print(json.dumps({**found.meta, "path": found.path}, indent=2))
        elif args.image_command == "rm":
            for name in args.images:
                for digest in store.remove(name, in_use):
                    print(f"deleted {digest}")
        else:
            deleted = store.prune(in_use, everything=args.all)
            for digest in deleted:
                print(f"deleted {digest}")
            print(f"{len(deleted)} image(s) deleted; the store holds {store.size() / 1e6:.1f} MB")
    except (StoreError, ValueError) as err:
        print(f"pyhpc image: {err}", file=sys.stderr)
        return 1
    return 0
