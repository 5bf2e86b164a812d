package node

// Distribution capability flags (erts/doc "Distribution Protocol", dist.hrl).
const (
	flagPublished          uint64 = 0x1
	flagExtendedReferences uint64 = 0x4
	flagDistMonitor        uint64 = 0x8
	flagFunTags            uint64 = 0x10
	flagDistMonitorName    uint64 = 0x20
	flagNewFunTags         uint64 = 0x80
	flagExtendedPidsPorts  uint64 = 0x100
	flagExportPtrTag       uint64 = 0x200
	flagBitBinaries        uint64 = 0x400
	flagNewFloats          uint64 = 0x800
	flagUnicodeIO          uint64 = 0x1000
	flagSmallAtomTags      uint64 = 0x4000
	flagUTF8Atoms          uint64 = 0x10000
	flagMapTag             uint64 = 0x20000
	flagBigCreation        uint64 = 0x40000
	flagSendSender         uint64 = 0x80000
	flagBigSeqtraceLabels  uint64 = 0x100000
	flagExitPayload        uint64 = 0x400000
	flagHandshake23        uint64 = 0x1000000
	flagUnlinkID           uint64 = 0x2000000
	flagV4NC               uint64 = 1 << 34

	// mandatory25 is what OTP 25 refuses to connect without.
	mandatory25 = flagExtendedReferences | flagFunTags | flagNewFunTags |
		flagExtendedPidsPorts | flagExportPtrTag | flagBitBinaries |
		flagNewFloats | flagUTF8Atoms | flagMapTag | flagBigCreation |
		flagHandshake23
	// mandatory26 adds what OTP 26, 27 and 28 refuse to connect without.
	mandatory26 = mandatory25 | flagV4NC | flagUnlinkID

	// ourFlags is what the sidecar advertises. flagPublished is absent on
	// purpose: that is what makes the node hidden, so that ejabberd lists it
	// in nodes(hidden), never joins it to global, and never meshes it with
	// the rest of the cluster. Atom caches and fragments are left out: the
	// pass-through message format is simpler and safe to parse.
	ourFlags = mandatory26 | flagDistMonitor | flagDistMonitorName |
		flagUnicodeIO | flagSmallAtomTags | flagSendSender |
		flagBigSeqtraceLabels | flagExitPayload
)
