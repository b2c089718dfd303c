# Helpers for drblk guest jobs.  Sourced (busybox sh) by /init before the job script,
# so every job can call these.  Installed in the initramfs as /lib/drblk/functions.sh.

# drblk_section NAME CMD [ARGS...]
#   Runs CMD, then prints its stdout between "DRBLK-BEGIN NAME" and "DRBLK-END NAME"
#   lines, its stderr (if any) as section "NAME.stderr", and "DRBLK-RC NAME <status>".
#   Output is buffered in /tmp and printed in one go, so nothing interleaves with it.
#   Returns CMD's status.
drblk_section() {
    _ds_name=$1; shift
    "$@" >/tmp/.drblk-sec.out 2>/tmp/.drblk-sec.err
    _ds_rc=$?
    drblk_print "$_ds_name" </tmp/.drblk-sec.out
    if [ -s /tmp/.drblk-sec.err ]; then
        drblk_print "$_ds_name.stderr" </tmp/.drblk-sec.err
    fi
    echo "DRBLK-RC $_ds_name $_ds_rc"
    rm -f /tmp/.drblk-sec.out /tmp/.drblk-sec.err
    return $_ds_rc
}

# drblk_print NAME  <input
#   Prints stdin as section NAME (a final newline is added if missing).
drblk_print() {
    echo "DRBLK-BEGIN $1"
    # awk adds the missing trailing newline and passes everything else through.
    awk '{ print }'
    echo "DRBLK-END $1"
}

# drblk_value NAME VALUE...   -> one line "DRBLK-VALUE NAME VALUE..."
drblk_value() {
    _dv_name=$1; shift
    echo "DRBLK-VALUE $_dv_name $*"
}

# drblk_wait_dev DEV [SECONDS]   (DEV like vda)
#   Waits (default 10 s) until /sys/block/DEV and /dev/DEV exist. Returns 1 on timeout.
drblk_wait_dev() {
    _dw_i=0
    _dw_max=$(( ${2:-10} * 10 ))
    while [ ! -e "/sys/block/$1" ] || [ ! -b "/dev/$1" ]; do
        [ $_dw_i -ge $_dw_max ] && { echo "DRBLK-ERROR timeout waiting for /dev/$1"; return 1; }
        sleep 0.1
        _dw_i=$((_dw_i + 1))
    done
    return 0
}

# drblk_disks   -> names of the virtio block devices (vda vdb ...), one per line
drblk_disks() {
    for _d in /sys/block/vd*; do [ -e "$_d" ] && echo "${_d##*/}"; done
}

# drblk_fwcfg NAME   -> path of the fw_cfg blob "opt/drblk/NAME" (extra host files)
drblk_fwcfg() {
    echo "/sys/firmware/qemu_fw_cfg/by_name/opt/drblk/$1/raw"
}
