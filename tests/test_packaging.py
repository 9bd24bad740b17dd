"""The licence: LICENSE holds the Apache License 2.0 that setup.py declares."""

import hashlib
import os
import re

from conftest import REPO

#: sha256 of the Apache License 2.0 text (https://www.apache.org/licenses/LICENSE-2.0.txt).
_APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_license_is_the_apache_2_0_text_declared_by_setup():
    with open(os.path.join(REPO, "LICENSE"), "rb") as f:
        text = f.read()
    assert hashlib.sha256(text).hexdigest() == _APACHE_2_0_SHA256
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        setup = f.read()
    assert re.search(r'license="Apache-2.0"', setup)
    assert re.search(r'license_files=\["LICENSE"\]', setup)
