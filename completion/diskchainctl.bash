# SPDX-License-Identifier: LGPL-2.1-or-later
# bash completion for diskchainctl(1): commands, their options and values,
# image paths in the storage roots (as the daemon lists them, absolute and
# relative to the first root), job ids, export names and plan names.  What
# the daemon lists comes from the daemon (a call on the system bus, which
# activates it); nothing is asked for a password.

__diskchainctl_q() {
    timeout 3 "${COMP_WORDS[0]:-diskchainctl}" --no-ask-password "$@" 2>/dev/null
}

# Image paths: absolute, and relative to the first storage root.
__diskchainctl_images() {
    local root abs
    root=$(timeout 3 busctl --system get-property org.diskchain.DiskChain1 /org/diskchain/DiskChain1 \
        org.diskchain.DiskChain1.Manager StorageRoots 2>/dev/null | sed -n 's/^as [0-9]* "\([^"]*\)".*/\1/p')
    __diskchainctl_q --json images | sed -n 's/^{"path": "\([^"]*\)".*/\1/p' | while IFS= read -r abs; do
        printf '%s\n' "$abs"
        [[ -n $root && $abs == "$root"/* ]] && printf '%s\n' "${abs#"$root"/}"
    done
}

# Active layers (a chain is named by its active layer).
__diskchainctl_chains() {
    local root
    root=$(timeout 3 busctl --system get-property org.diskchain.DiskChain1 /org/diskchain/DiskChain1 \
        org.diskchain.DiskChain1.Manager StorageRoots 2>/dev/null | sed -n 's/^as [0-9]* "\([^"]*\)".*/\1/p')
    __diskchainctl_q chains | awk '{ print $1 }' | while IFS= read -r abs; do
        printf '%s\n' "$abs"
        [[ -n $root && $abs == "$root"/* ]] && printf '%s\n' "${abs#"$root"/}"
    done
}

__diskchainctl_jobs() { __diskchainctl_q jobs | awk 'NR > 1 { print $1 }'; }
__diskchainctl_exports() { __diskchainctl_q exports | awk 'NR > 1 { print $1 }'; }
__diskchainctl_plans() { __diskchainctl_q plan list | awk '$1 != "no" { print $1 }'; }

# COMPREPLY: the words of $1 (separated by blanks) that start with $2.
__diskchainctl_reply() {
    local w
    COMPREPLY=()
    while IFS= read -r w; do
        [[ -n $w ]] && COMPREPLY+=("$w")
    done < <(compgen -W "$1" -- "$2")
}

_diskchainctl() {
    local cur prev words cword
    if declare -F _init_completion >/dev/null; then
        _init_completion -n = || return
    else
        cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} words=("${COMP_WORDS[@]}") cword=$COMP_CWORD
    fi

    local commands="images chains info create check map classify stream commit backup mirror snapshot
        export exports unexport bitmap jobs job wait monitor plan"
    local global="--help --json --no-ask-password"
    local job_opts="--job-id --speed --on-error --no-auto-finalize --no-auto-dismiss --no-wait --cache"
    local -A opts=(
        [create]="--backing --backing-format --format --cluster-size --compat --compression-type --preallocation --lazy-refcounts --refcount-bits"
        [check]="--repair"
        [stream]="--top --base --bottom --backing-file $job_opts"
        [commit]="--top --base --backing-file --force-shared-base $job_opts"
        [backup]="--sync --mode --format --compress --max-workers --max-chunk --bitmap --bitmap-mode --checkpoint $job_opts"
        [mirror]="--sync --mode --format --granularity --buf-size --no-unmap --copy-mode --complete --copy $job_opts"
        [snapshot]="--existing"
        [export]="--writable --name --socket --persistent --max-connections --tcp --cache --bitmap --snapshot --discard-after-read --on-cbw-error --cbw-timeout --checkpoint"
        [plan]="--chain --destination --schedule --randomized-delay-sec --level --full-every --compress --no-compress --mode --bitmap --speed --prune-after-run --no-prune-after-run --keep-last --keep-hourly --keep-daily --keep-weekly --keep-monthly --keep-yearly --dry-run --live --chain --format --name --point --no-wait"
        [bitmap]="--granularity --disabled --transient"
        [job]="--force --copy-mode"
    )
    local -A values=(
        [--sync]="full top none bitmap incremental"
        [--mode]="existing absolute-paths push pull"
        [--format]="qcow2 raw"
        [--backing-format]="qcow2 raw"
        [--bitmap-mode]="on-success never always"
        [--copy-mode]="background write-blocking"
        [--cache]="writeback none"
        [--on-error]="report ignore stop enospc"
        [--on-cbw-error]="break-guest-write break-snapshot"
        [--repair]="leaks all"
        [--level]="full incremental differential auto"
        [--compat]="0.10 1.1"
        [--compression-type]="zlib zstd"
        [--preallocation]="off metadata falloc full"
    )

    # the command: the first word that is no option
    local cmd="" verb="" i n=0 arg=0
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            -*) ;;
            *) if [[ -z $cmd ]]; then cmd=${words[i]}; elif [[ -z $verb ]]; then verb=${words[i]}; n=$i; fi
               arg=$((arg + 1)) ;;
        esac
    done

    if [[ -n ${values[$prev]} ]]; then
        __diskchainctl_reply "${values[$prev]}" "$cur"
        return
    fi
    case $prev in
        --backing|--top|--base|--bottom|--chain) __diskchainctl_reply "$(__diskchainctl_images)" "$cur"; return ;;
        --socket) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --job-id|--name|--speed|--max-workers|--max-chunk|--granularity|--buf-size|--cluster-size|--refcount-bits|\
        --checkpoint|--bitmap|--backing-file|--destination|--schedule|--randomized-delay-sec|--full-every|--keep-*|\
        --max-connections|--tcp|--cbw-timeout|--point)
            return ;;
    esac

    if [[ -z $cmd ]]; then
        if [[ $cur == -* ]]; then __diskchainctl_reply "$global" "$cur"; else __diskchainctl_reply "$commands" "$cur"; fi
        return
    fi
    if [[ $cur == -* ]]; then
        __diskchainctl_reply "${opts[$cmd]} $global" "$cur"
        return
    fi
    # positional arguments: ARG is how many words (command included) come before this one
    case $cmd in
        info|check|map|classify|create)
            if ((arg == 1)); then __diskchainctl_reply "$(__diskchainctl_images)" "$cur"
            elif [[ $cmd == classify ]] && ((arg == 2)); then __diskchainctl_reply "qcow2 raw" "$cur"; fi ;;
        stream|commit|backup|mirror|snapshot|export)
            ((arg == 1)) && __diskchainctl_reply "$(__diskchainctl_chains)" "$cur" ;;
        unexport) ((arg == 1)) && __diskchainctl_reply "$(__diskchainctl_exports)" "$cur" ;;
        wait) ((arg == 1)) && __diskchainctl_reply "$(__diskchainctl_jobs)" "$cur" ;;
        job)
            if ((arg == 1)); then
                __diskchainctl_reply "info pause resume cancel complete finalize dismiss set-speed change" "$cur"
            elif ((arg == 2)); then
                __diskchainctl_reply "$(__diskchainctl_jobs)" "$cur"
            fi ;;
        bitmap)
            if ((arg == 1)); then __diskchainctl_reply "add remove clear enable disable merge" "$cur"
            elif ((arg == 2)); then __diskchainctl_reply "$(__diskchainctl_images)" "$cur"; fi ;;
        plan)
            if ((arg == 1)); then
                __diskchainctl_reply "list show run verify prune restore create edit delete" "$cur"
            elif ((arg == 2)) && [[ $verb != create && $verb != list ]]; then
                __diskchainctl_reply "$(__diskchainctl_plans)" "$cur"
            fi ;;
    esac
}

complete -F _diskchainctl diskchainctl
