//! The Hyper-V VM definition written beside a VHDX standby: a PowerShell
//! script (`web.hyperv.ps1` for `web.vhdx`) that defines the standby VM
//! with `New-VM`.
//!
//! Hyper-V keeps a VM's configuration in `.vmcx` files, a binary format
//! with no public specification, so ferry writes the commands that make one
//! instead. The script reads the chain's top from `web.vhdx.chain.json`
//! when it runs, not when it was written: it stays right as boot points come
//! and go, so it is written once and never overwritten (an admin's edits
//! are kept).

/// The script's file name for the image stem `stem`.
pub fn script_name(stem: &str) -> String {
    format!("{stem}.hyperv.ps1")
}

/// A PowerShell single-quoted string literal of `s`. Inside one, only a
/// single quote is special, and PowerShell takes the typographic single
/// quotes (U+2018 to U+201B) as one too: each is doubled.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if matches!(c, '\'' | '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}') {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// The script for the image `image` (`web.vhdx`), whose sidecar is `json`
/// and whose name without extension is `stem`.
pub fn script_text(image: &str, json: &str, stem: &str) -> String {
    // File names go into comments too: keep those on one line.
    let comment = |s: &str| s.replace(['\r', '\n'], " ");
    let (image_c, json_c, script_c) = (comment(image), comment(json), comment(&script_name(stem)));
    let (json_q, vm_q) = (quoted(json), quoted(&format!("{stem}-standby")));
    format!(
        r#"# The Hyper-V standby VM for {image_c}, written by ferry.
#
# Run it on the Hyper-V host, in an elevated PowerShell, from anywhere:
#   .\{script_c} [-Name NAME] [-Generation 1|2] [-MemoryMB N] [-Processors N]
#       [-Switch VIRTUAL_SWITCH] [-Disk FILE] [-SecureBoot] [-Start]
#
# The VM's disk is the top of the chain that {json_c} names (the
# working image; its parents hold the boot points). Define the VM when the
# source is gone: the VM then writes into that top, so no sync may follow.
# To boot a boot point while syncs go on, export it first
# (ferry boot-points export TARGET NAME copy.vhdx) and pass -Disk copy.vhdx.
#
# -Generation 1 (the default) starts the disk as a BIOS does: an MBR disk
# with a BIOS boot loader. -Generation 2 is UEFI: a GPT disk with an EFI
# system partition; Secure Boot stays off unless -SecureBoot is given.
# ferry writes this file once and never overwrites it: edit it freely.
[CmdletBinding()]
param(
    [string]$Name = {vm_q},
    [ValidateSet(1, 2)][int]$Generation = 1,
    [ValidateRange(32, 1048576)][int]$MemoryMB = 2048,
    [ValidateRange(1, 240)][int]$Processors = 2,
    [string]$Switch = '',
    [string]$Disk = '',
    [switch]$SecureBoot,
    [switch]$Start
)
$ErrorActionPreference = 'Stop'
if ($Disk -eq '') {{
    $chain = Get-Content -Raw -LiteralPath (Join-Path $PSScriptRoot {json_q}) | ConvertFrom-Json
    $Disk = $chain.top
}}
if (-not [System.IO.Path]::IsPathRooted($Disk)) {{
    $Disk = Join-Path $PSScriptRoot $Disk
}}
$new = @{{
    Name               = $Name
    Generation         = $Generation
    MemoryStartupBytes = [int64]$MemoryMB * 1MB
    VHDPath            = $Disk
}}
if ($Switch -ne '') {{
    $new.SwitchName = $Switch
}}
$vm = New-VM @new
Set-VMProcessor -VM $vm -Count $Processors
if ($Generation -eq 2) {{
    $onOff = if ($SecureBoot) {{ 'On' }} else {{ 'Off' }}
    Set-VMFirmware -VM $vm -EnableSecureBoot $onOff -FirstBootDevice (Get-VMHardDiskDrive -VM $vm)
}}
Write-Host "defined VM $Name with disk $Disk"
if ($Start) {{
    Start-VM -VM $vm
}}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single_quote(c: char) -> bool {
        matches!(c, '\'' | '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}')
    }

    /// What a PowerShell parser would trip on first: an unbalanced bracket
    /// or an unterminated string. Knows single- and double-quoted strings
    /// (both may span lines) and `#` comments, which is all the script uses.
    fn balanced(script: &str) -> Result<(), String> {
        let mut open = Vec::new();
        let mut quote: Option<char> = None;
        let mut chars = script.chars().peekable();
        while let Some(c) = chars.next() {
            match quote {
                Some('"') if c == '"' => quote = None,
                Some('"') => {}
                Some(_) if single_quote(c) => {
                    // A doubled quote is one quote inside the string.
                    if chars.next_if(|&d| single_quote(d)).is_none() {
                        quote = None;
                    }
                }
                Some(_) => {}
                None => match c {
                    '#' => while chars.next_if(|&d| d != '\n').is_some() {},
                    '"' => quote = Some(c),
                    c if single_quote(c) => quote = Some(c),
                    '(' | '[' | '{' => open.push(c),
                    ')' | ']' | '}' => {
                        let want = match c {
                            ')' => '(',
                            ']' => '[',
                            _ => '{',
                        };
                        if open.pop() != Some(want) {
                            return Err(format!("stray {c}"));
                        }
                    }
                    _ => {}
                },
            }
        }
        match (quote, open.last()) {
            (Some(q), _) => Err(format!("unterminated {q} string")),
            (None, Some(o)) => Err(format!("unclosed {o}")),
            (None, None) => Ok(()),
        }
    }

    #[test]
    fn the_script_names_the_sidecar_and_a_vm() {
        let s = script_text("web.vhdx", "web.vhdx.chain.json", "web");
        assert!(
            s.contains("(Join-Path $PSScriptRoot 'web.vhdx.chain.json')"),
            "{s}"
        );
        assert!(s.contains("[string]$Name = 'web-standby',"), "{s}");
        assert!(s.contains("$vm = New-VM @new"), "{s}");
        assert!(s.contains(".\\web.hyperv.ps1 [-Name NAME]"), "{s}");
        balanced(&s).unwrap();
    }

    #[test]
    fn quotes_in_names_cannot_end_the_string() {
        let s = script_text(
            "it's\u{2019}.vhdx",
            "it's\u{2019}.vhdx.chain.json",
            "it's\u{2019}",
        );
        assert!(
            s.contains("(Join-Path $PSScriptRoot 'it''s\u{2019}\u{2019}.vhdx.chain.json')"),
            "{s}"
        );
        balanced(&s).unwrap();
        // The check itself sees an unquoted name.
        let raw = s.replacen("it''s\u{2019}\u{2019}", "it's", 1);
        assert!(balanced(&raw).is_err());
    }

    #[test]
    fn line_breaks_in_names_stay_out_of_the_comments() {
        let s = script_text("a\nb.vhdx", "a\nb.vhdx.chain.json", "a\nb");
        assert!(
            s.starts_with("# The Hyper-V standby VM for a b.vhdx, written by ferry.\n"),
            "{s}"
        );
        // In the string literal the break is part of the name.
        assert!(s.contains("'a\nb.vhdx.chain.json'"), "{s}");
        balanced(&s).unwrap();
    }
}
