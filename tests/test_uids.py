from __future__ import annotations

import pytest

from pacsfetch.uids import check_ae_title, is_valid_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "0.1", "2.25." + "9" * 58])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid", ["", "1", "1..2", "1.02", "../../etc/passwd", "1.2/3", "1.2.3 ", "2.25." + "9" * 60,
            None, 1.2, "1.2.3\x00", "１.２"],
)
def test_invalid_uids(uid: object) -> None:
    assert not is_valid_uid(uid)


def test_ae_title_rules() -> None:
    assert check_ae_title(" PACSFETCH ") == "PACSFETCH"
    for bad in ["", "   ", "A" * 17, "BACK\\SLASH", "TAB\t"]:
        with pytest.raises(ValueError):
            check_ae_title(bad)
