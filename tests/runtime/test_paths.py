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
