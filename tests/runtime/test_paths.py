from pathlib import Path

from nomad_driver.runtime.paths import within


def test_whole_path_components_only(tmp_path: Path) -> None:
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch2").mkdir()
    (tmp_path / "scratch2" / "img").touch()
    (tmp_path / "scratch" / "img").touch()
    allowed = [str(tmp_path / "scratch")]
    assert within(str(tmp_path / "scratch" / "img"), allowed) == str(tmp_path / "scratch" / "img")
    assert within(str(tmp_path / "scratch2" / "img"), allowed) is None
    assert within(str(tmp_path / "scratch" / ".." / "scratch2" / "img"), allowed) is None


def test_symlinks_are_resolved_before_the_check(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    secret = tmp_path / "elsewhere.sqsh"
    secret.touch()
    (tmp_path / "images" / "link.sqsh").symlink_to(secret)
    assert within(str(tmp_path / "images" / "link.sqsh"), [str(tmp_path / "images")]) is None
    assert within(str(tmp_path / "images" / "link.sqsh"), ["/"]) == str(secret)


def test_bind_syntax_is_checked_and_named() -> None:
    import pytest

    from nomad_driver.runtime.paths import parse_bind

    assert parse_bind("/scratch", "mounts") == ("/scratch", "/scratch", False)
    assert parse_bind("/scratch/a:/data:ro", "mounts") == ("/scratch/a", "/data", True)
    for bad, message in [
        ("rel:/x", "absolute"),
        ("/a:/b:rx", "ro or rw"),
        ("/a:/b/../../etc", "'..'"),
        ("/a:/b:ro:x", r"SRC\[:DST"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_bind(bad, "mounts")
