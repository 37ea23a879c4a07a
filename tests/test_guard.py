"""The daemon never dies on a request: the handler guard, without a mount."""

import errno
import logging

import pyfuse3
import pytest

from unionfs.operations import _guard


async def test_oserror_becomes_its_errno():
    @_guard
    async def handler(self):
        raise FileNotFoundError(errno.ENOENT, "gone")

    with pytest.raises(pyfuse3.FUSEError) as info:
        await handler(None)
    assert info.value.errno == errno.ENOENT


async def test_fuse_error_passes_through():
    @_guard
    async def handler(self):
        raise pyfuse3.FUSEError(errno.EXDEV)

    with pytest.raises(pyfuse3.FUSEError) as info:
        await handler(None)
    assert info.value.errno == errno.EXDEV


async def test_unexpected_exception_is_logged_and_answered_eio(caplog):
    @_guard
    async def handler(self, arg):
        raise ZeroDivisionError("bug")

    with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as info:
        await handler(None, 42)
    assert info.value.errno == errno.EIO
    assert "ZeroDivisionError" in caplog.text and "handler" in caplog.text
