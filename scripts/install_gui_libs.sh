#!/usr/bin/env bash
# Install Debian's Xvfb, Mesa OpenGL and the xcb/xkb libraries Qt 6 needs, when missing (headless GUI tests).
set -euo pipefail
PKGS="xvfb xauth libgl1-mesa-dri libglx-mesa0 libgl1 libegl1 libopengl0 libdbus-1-3 libxkbcommon-x11-0
libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0
libxcb-xinput0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libfontconfig1 x11-utils"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "installing:$missing"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
