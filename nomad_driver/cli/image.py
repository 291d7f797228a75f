"""`pyhpc image`: import, push, pull, list, inspect, sign, verify, export, remove and prune
images in the store.

The store, the run_dir (which images running tasks use), the zstd level, the size cap and the
registry CA come from the system policy, /etc/pyhpc/pyhpc.hcl, as `pyhpc run` reads it (or
--config); an option given here wins. Every failure is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from nomad_driver.util.errors import PyhpcError

DEFAULT_STORE = "/var/lib/pyhpc/store"
DIGEST_FORMS = (
    "a reference, a sha256 digest, or a unique start of one as `pyhpc image ls` prints it"
)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "image",
        help="import, pull, push, sign, verify, list, inspect, export, remove and prune images",
    )
    p.add_argument(
        "--config",
        metavar="FILE|DIR",
        help="the Nomad agent configuration whose pyhpc plugin block names the store, run_dir, "
        "store_max_mb, image_zstd_level and registry_ca_file (default /etc/pyhpc/pyhpc.hcl if "
        "it exists, else the built-in defaults)",
    )
    p.add_argument(
        "--store",
        default=None,
        help=f"image store directory (default $PYHPC_STORE, else the policy's store_dir, "
        f"{DEFAULT_STORE} unless set)",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help="the driver's run_dir, to see which images running tasks use (default: the policy's)",
    )
    p.add_argument(
        "--level",
        type=int,
        default=None,
        choices=range(1, 23),
        metavar="1-22",
        help="zstd level of imported images (default: the policy's image_zstd_level, 3; "
        "1 fastest, 19 smallest)",
    )
    p.add_argument(
        "--registry-ca",
        metavar="PEM",
        help="CA certificate of the registry's TLS (default: the policy's registry_ca_file, "
        "else the system's)",
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
    for action in (imp, pull):
        action.add_argument(
            "--pull-timeout",
            default="5m",
            metavar="DURATION",
            help="how long a registry pull goes on retrying failed requests (default 5m, as "
            "the task option image_pull_timeout)",
        )
    push = acts.add_parser("push", help="push a stored image to a registry as an ORAS artifact")
    push.add_argument("image", metavar="IMAGE", help=DIGEST_FORMS)
    push.add_argument("dest", metavar="oras://HOST/REPO:TAG")
    for action in (imp, pull, push):
        action.add_argument(
            "--creds",
            metavar="USER[:PASSWORD]",
            help="the registry login (asked for on the terminal when PASSWORD is left out); "
            "default: $PYHPC_REGISTRY_USER/$PYHPC_REGISTRY_PASSWORD, then the auth files",
        )
        action.add_argument(
            "--authfile",
            metavar="FILE",
            help="a containers auth.json or Docker config.json to take logins from (default: "
            "$REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, "
            "~/.config/containers/auth.json, then $DOCKER_CONFIG/config.json or "
            "~/.docker/config.json)",
        )
    sign = acts.add_parser(
        "sign",
        help="sign an image with a key held in Vault's transit engine",
        description="Vault address and token from VAULT_ADDR and VAULT_TOKEN, as the Vault CLI. "
        "The signature (a DSSE envelope) binds the image's digest to IMAGE as you name it, and "
        "is written beside the image as IMAGE.dsse.json (with those of its other names).",
    )
    sign.add_argument("image", metavar="IMAGE", help=f"{DIGEST_FORMS}, or a SquashFS path")
    sign.add_argument("--key", required=True, help="transit key name")
    sign.add_argument(
        "--cosign-bundle",
        metavar="FILE",
        help="also write a cosign bundle of the SquashFS file's signature, for `cosign "
        "verify-blob --key PEM --bundle FILE --insecure-ignore-tlog IMAGE.sqsh` (an "
        "ecdsa-p256 transit key; its PEM is in `vault read transit/keys/KEY`)",
    )
    sign.add_argument("--transit", help="transit mount (default: the policy's, transit)")
    verify = acts.add_parser(
        "verify",
        help="check an image's signature; exit 1 naming the failed check",
        description="Any signature of the image's digest by a trusted key passes, whichever of "
        "the image's references it was made for.",
    )
    verify.add_argument("image", metavar="IMAGE", help=f"{DIGEST_FORMS}, or a SquashFS path")
    verify.add_argument(
        "--key", action="append", help="trusted transit key (default: the policy's signature_keys)"
    )
    verify.add_argument("--transit", help="transit mount (default: the policy's, transit)")
    acts.add_parser("ls", help="list stored images")
    ins = acts.add_parser("inspect", help="show an image's digests, sources and config")
    ins.add_argument("image", metavar="IMAGE", help=DIGEST_FORMS)
    export = acts.add_parser(
        "export",
        help="copy a stored image out as a SquashFS file (with its signature, if any)",
    )
    export.add_argument("image", metavar="IMAGE", help=DIGEST_FORMS)
    export.add_argument("-o", "--output", required=True, metavar="FILE.sqsh")
    export.add_argument("--force", action="store_true", help="replace FILE if it exists")
    rm = acts.add_parser("rm", help="remove a reference, and the image if nothing else uses it")
    rm.add_argument("images", nargs="+", metavar="IMAGE", help=DIGEST_FORMS)
    prune = acts.add_parser("prune", help="delete unreferenced images not used by any task")
    prune.add_argument("--all", action="store_true", help="delete every image no task uses")


class Refused(PyhpcError):
    """A one-line answer to the user; nothing was changed."""


@dataclass(frozen=True)
class Settings:
    """What the command works on: the options given, else the system policy's."""

    store: str
    run_dir: str
    level: int
    max_bytes: int
    registry_ca: str
    keys: tuple[str, ...]
    transit: str


def settings(args: argparse.Namespace) -> Settings:
    from nomad_driver.cli import run as run_cli
    from nomad_driver.driver import config
    from nomad_driver.wire import schema

    default = run_cli.DEFAULT_CONFIG
    path = args.config or (default if os.path.exists(default) else None)
    try:
        if path:
            plugin = run_cli.load_policy(path)
        else:
            plugin = schema.load(config.PluginConfig, {}, "built-in defaults")
    except schema.ConfigError as err:
        raise Refused(" ".join(str(err).split())) from err
    except OSError as err:
        raise Refused(f"cannot read the policy {path}: {err.strerror or err}") from err
    return Settings(
        store=args.store or os.environ.get("PYHPC_STORE") or plugin.store_dir,
        run_dir=args.run_dir or plugin.run_dir,
        level=args.level or int(plugin.image_zstd_level),
        max_bytes=plugin.store_max_bytes,
        registry_ca=args.registry_ca or plugin.registry_ca_file,
        keys=tuple(getattr(args, "key", None) or plugin.signature_keys),
        transit=getattr(args, "transit", None) or plugin.vault_transit_mount,
    )


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


def _signed_name(store: Any, text: str) -> tuple[str, str]:
    """(image file, the reference a signature binds) for IMAGE as the user named it: a
    SquashFS path as itself, a digest form as the full digest, a reference normalised."""
    from nomad_driver.images import reference

    if text.startswith("/"):
        path = os.path.normpath(text)
        if not os.path.isfile(path):
            raise Refused(f"no image file {text!r}")
        return path, path
    found = store.resolve(text)
    if store.digest_form(text):
        return found.path, found.digest
    return found.path, str(reference.parse(text))


def _signing(args: argparse.Namespace, store: Any, cfg: Settings) -> None:
    from nomad_driver.signing.vault import Vault, VaultError
    from nomad_driver.signing.verify import SignatureError, Verifier, cache_dir, describe, sign

    path, name = _signed_name(store, args.image)
    vault = Vault(transit=cfg.transit)
    try:
        if args.image_command == "sign":
            payload = sign(vault, path, name, args.key)
            print(
                f"signed {payload.digest} as {name} with {payload.key} v{payload.key_version}: "
                f"{path}.dsse.json"
            )
            if args.cosign_bundle:
                print(f"cosign bundle: {_cosign_bundle(vault, path, args.key, args.cosign_bundle)}")
            return
        if not cfg.keys:
            raise Refused("name a trusted key with --key (the policy's signature_keys is empty)")
        verified = Verifier(vault, cfg.keys, cache_dir(cfg.run_dir)).verify(path, name)
        print(json.dumps(describe(verified)))
    except (SignatureError, VaultError) as err:
        raise Refused(f"{args.image_command}: {' '.join(str(err).split())}") from err


def _cosign_bundle(vault: Any, path: str, key: str, output: str) -> str:
    """Sign the file's SHA-256 with an ECDSA transit key; write the cosign blob bundle."""
    from nomad_driver.signing.cosign import blob_bundle
    from nomad_driver.util.digest import file_digest
    from nomad_driver.util.files import write_atomic

    keys, _ = vault.public_keys(key)
    if any(k.algorithm != "ecdsa-p256" for k in keys):
        raise Refused(
            f"--cosign-bundle: transit key {key} is {keys[0].algorithm}; cosign verifies blob "
            "signatures of ecdsa-p256 keys made this way (pyhpc vault setup --algorithm ecdsa-p256)"
        )
    digest = bytes.fromhex(file_digest(path).partition(":")[2])
    signature, _ = vault.sign(key, digest, prehashed=True)
    write_atomic(output, blob_bundle(signature))
    os.chmod(output, 0o644)  # a signature: meant to be handed round
    return output


def _registry(cfg: Settings, args: argparse.Namespace, text: str) -> dict[str, Any]:
    """The registry client for text, with the login the command line gives."""
    from nomad_driver.images import reference
    from nomad_driver.images.credentials import Credentials, Keychain
    from nomad_driver.images.registry import Registry

    try:
        ref = reference.parse(text)
    except reference.ReferenceError as err:
        raise Refused(str(err)) from err
    if not ref.remote:
        return {}
    login = None
    if args.creds:
        user, sep, password = args.creds.partition(":")
        if not user:
            raise Refused("--creds: expected USER[:PASSWORD]")
        if not sep:
            import getpass

            if not sys.stdin.isatty():
                raise Refused("--creds USER: give USER:PASSWORD (no terminal to ask on)")
            password = getpass.getpass(f"password for {user} at {ref.registry}: ")
        login = Credentials(user, password, "--creds")
    if args.authfile and not os.path.isfile(args.authfile):
        raise Refused(f"--authfile {args.authfile}: no such file")
    keychain = Keychain(login=login, files=(args.authfile,) if args.authfile else None)
    return {"registry": Registry(ref.registry, keychain, ca_file=cfg.registry_ca or None)}


def _pull_timeout(text: str) -> float:
    from nomad_driver.util.durations import parse_duration

    seconds = parse_duration(text)
    if seconds is None or seconds <= 0:
        raise Refused(f'--pull-timeout {text!r}: expected a duration such as "30s" or "5m"')
    return seconds


def export(image: Any, output: str, force: bool) -> str:
    """Copy a stored image (and its signature, if any) to output, atomically: a reader finds
    the whole, checked copy or nothing. Returns the path written."""
    import shutil

    from nomad_driver.util.digest import file_digest

    dest = os.path.abspath(output)
    if os.path.isdir(dest):
        raise Refused(f"-o {output}: is a directory; name the file to write")
    if os.path.lexists(dest) and not force:
        raise Refused(f"-o {output}: exists; give --force to replace it")
    signature = image.path + ".dsse.json"
    written: list[str] = []
    try:
        pairs = [(image.path, dest)]  # the image first: checked before anything is replaced
        if os.path.exists(signature):
            pairs.append((signature, dest + ".dsse.json"))
        elif os.path.lexists(dest + ".dsse.json"):
            os.unlink(dest + ".dsse.json")  # another image's, replaced with --force
        for source, target in pairs:
            tmp = os.path.join(
                os.path.dirname(target), f".{os.path.basename(target)}.{os.getpid()}.tmp"
            )
            written.append(tmp)
            shutil.copyfile(source, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
        if file_digest(written[0]) != image.digest:
            raise Refused(f"the copy at {dest} does not match {image.digest}; nothing written")
        for tmp, (_, target) in zip(written, pairs, strict=True):
            os.replace(tmp, target)
    except OSError as err:
        raise Refused(f"-o {output}: {err.strerror or err}") from err
    finally:
        for tmp in written:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dest


def run(args: argparse.Namespace) -> int:
    from nomad_driver.images.store import StoreAccessError, StoreError

    try:
        return _run(args)
    except StoreAccessError as err:
        hint = (
            "" if os.geteuid() == 0 else "; run it as root, or name a store of yours with --store"
        )
        print(f"pyhpc image: {err}{hint}", file=sys.stderr)
    except (Refused, StoreError, ValueError) as err:
        print(f"pyhpc image: {err}", file=sys.stderr)
    except PermissionError as err:
        print(
            f"pyhpc image: {err.filename or ''}: {err.strerror} (uid {os.geteuid()}); run it as "
            "root, or name a store of yours with --store",
            file=sys.stderr,
        )
    except OSError as err:
        print(f"pyhpc image: {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
    return 1


def _run(args: argparse.Namespace) -> int:
    from nomad_driver.images import publish
    from nomad_driver.images.store import Store
    from nomad_driver.runtime.imagemount import SharedImages, images_dir

    cfg = settings(args)
    shared = SharedImages(images_dir(cfg.run_dir))
    store = Store(
        cfg.store,
        max_bytes=cfg.max_bytes,
        level=cfg.level,
        in_use=lambda digest: bool(shared.users(digest)),
    )
    if args.image_command in ("import", "pull"):
        action = store.ensure if args.image_command == "import" else store.pull
        image = action(
            args.ref,
            _progress(),
            _meter(),
            pull_timeout=_pull_timeout(args.pull_timeout),
            **_registry(cfg, args, args.ref),
        )
        if getattr(args, "tag", None):
            store.tag(image.digest, args.tag)
        print(f"{image.digest}  {image.path}  {image.meta['size'] / 1e6:.1f} MB")
    elif args.image_command == "push":
        found = store.resolve(args.image)
        print(publish.push(found, args.dest, _progress(), **_registry(cfg, args, args.dest)))
    elif args.image_command in ("sign", "verify"):
        _signing(args, store, cfg)
    elif args.image_command == "ls":
        import time

        refs: dict[str, list[str]] = {}
        for ref, digest in store.references().items():
            refs.setdefault(digest, []).append(ref)
        print(f"{'DIGEST':19}  {'SIZE':>9}  {'IN USE':6}  {'LAST USED':16}  REFERENCES")
        for image in store.images():
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(store.last_used(image.digest)))
            print(
                f"{image.digest[:19]}  {image.meta['size'] / 1e6:7.1f}MB  "
                f"{'yes' if store.used(image.digest) else 'no':6}  {used:16}  "
                f"{', '.join(sorted(refs.get(image.digest, []))) or '-'}"
            )
    elif args.image_command == "inspect":
        found = store.resolve(args.image)
        references = sorted(r for r, d in store.references().items() if d == found.digest)
        print(json.dumps({**found.meta, "references": references, "path": found.path}, indent=2))
    elif args.image_command == "export":
        found = store.resolve(args.image)
        print(f"{found.digest}  {export(found, args.output, args.force)}")
    elif args.image_command == "rm":
        for name in args.images:
            for digest in store.remove(name):
                print(f"deleted {digest}")
    else:
        deleted = store.prune(everything=args.all)
        for digest in deleted:
            print(f"deleted {digest}")
        print(f"{len(deleted)} image(s) deleted; the store holds {store.size() / 1e6:.1f} MB")
    return 0
