"""Where an installed controller's files live (`reled-edge install`), under a root: "/" on a controller, a temp
folder in the tests. The systemd unit, the device files and the install command all read these paths from here,
so the unit's directories, the device file's paths and what `install` creates cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SERVICE_USER = "reled"
UNIT_NAME = "reled-edge@.service"


@dataclass(frozen=True)
class Layout:
    root: Path = Path("/")

    def under(self, path: str) -> Path:
        return self.root / path

    @property
    def system(self) -> bool:
        """The machine's own tree (where systemd's StateDirectory= and LogsDirectory= are these folders)."""
        return self.root == Path("/")

    @property
    def etc(self) -> Path:
        return self.under("etc/reled-edge")

    @property
    def devices(self) -> Path:
        return self.etc / "devices"

    @property
    def profiles(self) -> Path:
        return self.etc / "profiles"

    @property
    def public_key(self) -> Path:
        return self.etc / "signing.pub"

    @property
    def ca_file(self) -> Path:
        return self.etc / "ca.crt"

    def secret(self, device: str) -> Path:
        return self.etc / f"{device}.secret"

    def device_file(self, device: str) -> Path:
        return self.devices / f"{device}.toml"

    @property
    def state_root(self) -> Path:
        return self.under("var/lib/reled-edge")

    def state_dir(self, device: str) -> Path:
        return self.state_root / device

    def recording(self, device: str) -> Path:
        return self.state_dir(device) / "recording.npz"

    @property
    def logs(self) -> Path:
        return self.under("var/log/reled-edge")

    def signal_log(self, device: str) -> Path:
        return self.logs / f"{device}-signal.log"

    @property
    def unit_file(self) -> Path:
        return self.under("etc/systemd/system") / UNIT_NAME

    @property
    def venv(self) -> Path:
        return self.under("opt/reled/.venv")
