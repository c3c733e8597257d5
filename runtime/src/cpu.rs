//! The CPU the runtime runs on, as Cranelift sees it: the ISA flags the JIT will target and the
//! vector extensions that select kernels.

/// What the host CPU offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuInfo {
    /// Cranelift's target triple for the host.
    pub triple: String,
    /// ISA features Cranelift detected and enabled (`has_avx2`, `has_avx512vnni`...).
    pub features: Vec<String>,
}

impl CpuInfo {
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

/// Detects the host CPU through cranelift-native.
pub fn host() -> Result<CpuInfo, String> {
    let builder = cranelift_native::builder().map_err(|e| format!("this CPU is not supported by the JIT: {e}"))?;
    let flags = cranelift_codegen::settings::Flags::new(cranelift_codegen::settings::builder());
    let isa = builder.finish(flags).map_err(|e| format!("this CPU is not supported by the JIT: {e}"))?;
    let triple = isa.triple().to_string();
    let features =
        isa.isa_flags().iter().filter(|v| v.as_bool().unwrap_or(false)).map(|v| v.name.to_string()).collect();
    Ok(CpuInfo { triple, features })
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn host_has_sse2_and_a_triple() {
        let cpu = super::host().unwrap();
        assert!(cpu.triple.starts_with("x86_64"), "{}", cpu.triple);
        assert!(cpu.has("has_sse3") || cpu.has("has_sse41") || !cpu.features.is_empty(), "{cpu:?}");
    }
}
