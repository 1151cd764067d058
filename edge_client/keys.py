"""Where the device keeps the 256-bit key of its tuple store.

- ``KeyringKeyProvider``: the OS keyring (Keychain, Secret Service, Windows Credential Locker) through the
  optional ``keyring`` package; used only when it is importable and has a real backend.
- ``KeyFileProvider``: a key file created with mode 0600 (atomically: temp file + fsync + link). On load
  the file must be a regular file (not a symlink), owned by this user, exactly 32 bytes, and not readable
  or writable by group or others; otherwise ``KeyPermissionError`` / ``KeyProviderError``.

``destroy()`` is crypto-shredding: the key is overwritten, then removed; data encrypted under it cannot be
decrypted afterwards, even from a copy of the disk taken earlier (unless the key itself was copied). On
flash storage an overwrite is best effort (wear levelling may keep old blocks); the keyring path keeps
the key off the data partition altogether.

Only the standard library and ``cryptography`` are needed.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
KEY_FILE_NAME = "store.key"
KEYRING_SERVICE = "rib-edge"

try:  # optional: the OS keyring
    import keyring as _keyring  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - absent in the test environment
    _keyring = None


class KeyProviderError(RuntimeError):
    """The key cannot be loaded, created or destroyed."""


class KeyPermissionError(KeyProviderError):
    """A key file is readable or writable by someone other than its owner (or is not a plain file)."""


class KeyProvider(Protocol):
    """Loads (creating on first use) and destroys one store key."""

    description: str

    def load(self, create: bool = True) -> bytes:
        """The key; created when missing and ``create``; KeyProviderError when missing otherwise."""
        ...

    def exists(self) -> bool:
        """Whether a key is present."""
        ...

    def destroy(self) -> None:
        """Overwrite and remove the key (no-op when absent)."""
        ...


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename or unlink inside it survives a crash (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class KeyFileProvider:
    """A 32-byte key in a file of mode 0600."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.description = f"key file {self.path}"

    def exists(self) -> bool:
        return os.path.lexists(self.path)

    def load(self, create: bool = True) -> bytes:
        if not self.exists():
            if not create:
                raise KeyProviderError(f"{self.description} does not exist (store erased or key lost)")
            self._create()
        return self._read()

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = AESGCM.generate_key(bit_length=256)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, self.path)  # fails if another process created the key meanwhile: theirs wins
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        fsync_dir(self.path.parent)

    def _read(self) -> bytes:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            raise KeyProviderError(f"{self.description} does not exist") from None
        if not stat.S_ISREG(info.st_mode):
            raise KeyPermissionError(f"{self.description} is not a regular file (symlinks are refused)")
        if os.name == "posix":
            if info.st_mode & 0o077:
                raise KeyPermissionError(
                    f"{self.description} has mode {stat.S_IMODE(info.st_mode):04o}; it must not be accessible "
                    f"to group or others (chmod 600 {self.path})"
                )
            if hasattr(os, "getuid") and info.st_uid != os.getuid():
                raise KeyPermissionError(
                    f"{self.description} is owned by uid {info.st_uid}, not by this user"
                )
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            key = os.read(fd, KEY_BYTES + 1)
        finally:
            os.close(fd)
        if len(key) != KEY_BYTES:
            raise KeyProviderError(f"{self.description} holds {len(key)} bytes, expected {KEY_BYTES}")
        return key

    def destroy(self) -> None:
        if not self.exists():
            return
        try:
            info = os.lstat(self.path)
            if stat.S_ISREG(info.st_mode):
                fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
                try:
                    size = max(info.st_size, KEY_BYTES)
                    for pattern in (os.urandom(size), b"\x00" * size):
                        os.lseek(fd, 0, os.SEEK_SET)
                        os.write(fd, pattern)
                        os.fsync(fd)
                finally:
                    os.close(fd)
        finally:
            os.unlink(self.path)
            fsync_dir(self.path.parent)


def keyring_available() -> bool:
    """Whether the optional ``keyring`` package is importable and has a usable (non-null) backend."""
    if _keyring is None:
        return False
    try:  # pragma: no cover - needs keyring
        backend = _keyring.get_keyring()
        priority = getattr(backend, "priority", 0)
        name = type(backend).__module__ + "." + type(backend).__name__
        return bool(priority and priority > 0) and "fail" not in name.lower() and "null" not in name.lower()
    except Exception:  # pragma: no cover
        return False


class KeyringKeyProvider:  # pragma: no cover - needs the optional keyring package and an OS backend
    """A key in the OS keyring under service ``rib-edge`` and a per-store account name."""

    def __init__(self, account: str, service: str = KEYRING_SERVICE):
        if not keyring_available():
            raise KeyProviderError("the keyring package or a usable keyring backend is not available")
        self.service = service
        self.account = account
        self.description = f"keyring entry {service}/{account}"

    def exists(self) -> bool:
        return _keyring.get_password(self.service, self.account) is not None

    def load(self, create: bool = True) -> bytes:
        try:
            text = _keyring.get_password(self.service, self.account)
            if text is None:
                if not create:
                    raise KeyProviderError(f"{self.description} does not exist (store erased or key lost)")
                _keyring.set_password(
                    self.service, self.account, base64.b64encode(AESGCM.generate_key(256)).decode()
                )
                text = _keyring.get_password(self.service, self.account)
            key = base64.b64decode(text, validate=True)
        except KeyProviderError:
            raise
        except (binascii.Error, ValueError, TypeError) as err:
            raise KeyProviderError(f"{self.description} is not a valid key: {err}") from None
        except Exception as err:
            raise KeyProviderError(f"{self.description}: keyring failed: {err}") from err
        if len(key) != KEY_BYTES:
            raise KeyProviderError(f"{self.description} holds {len(key)} bytes, expected {KEY_BYTES}")
        return key

    def destroy(self) -> None:
        if not self.exists():
            return
        try:
            _keyring.set_password(
                self.service, self.account, base64.b64encode(os.urandom(KEY_BYTES)).decode()
            )
            _keyring.delete_password(self.service, self.account)
        except Exception as err:
            raise KeyProviderError(f"{self.description}: could not destroy the key: {err}") from err


def default_key_provider(directory: str | os.PathLike[str], prefer_keyring: bool = True) -> KeyProvider:
    """The OS keyring when usable (account derived from the store's absolute path), else ``<dir>/store.key``."""
    directory = Path(directory)
    if prefer_keyring and keyring_available():  # pragma: no cover - needs keyring
        import hashlib

        account = "store-" + hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:24]
        return KeyringKeyProvider(account)
    return KeyFileProvider(directory / KEY_FILE_NAME)
