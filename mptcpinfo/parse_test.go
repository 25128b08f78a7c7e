//go:build linux

package mptcpinfo

import (
	"encoding/binary"
	"net/netip"
	"reflect"
	"testing"
	"time"
)

// build makes an MPTCP_FULL_INFO reply by hand: the head, an mptcp_info
// of miLen bytes, and arrays with the given strides.
func build(num, arrays, sfStride, tiStride uint32, miLen int) (reply, sf, ti []byte) {
	reply = make([]byte, fullInfoHead+mptcpInfoSize)
	ne.PutUint32(reply[offSizeTCPInfoKernel:], 248)
	ne.PutUint32(reply[offSizeTCPInfoUser:], tiStride)
	ne.PutUint32(reply[offSizeSFInfoKernel:], sfInfoSize)
	ne.PutUint32(reply[offSizeSFInfoUser:], sfStride)
	ne.PutUint32(reply[offNumSubflows:], num)
	ne.PutUint32(reply[offSizeArraysUser:], arrays)
	mi := reply[fullInfoHead:]
	mi[miSubflows], mi[miAddAddrSignal], mi[miAddAddrAccepted], mi[miSubflowsMax] = 1, 2, 3, 4
	ne.PutUint32(mi[miFlags:], FlagRemoteKeyReceived)
	ne.PutUint32(mi[miToken:], 0xdeadbeef)
	ne.PutUint32(mi[miRetransmits:], 7)
	ne.PutUint64(mi[miBytesSent:], 1000)
	ne.PutUint64(mi[miBytesReceived:], 2000)
	ne.PutUint64(mi[miBytesAcked:], 900)
	mi[miSubflowsTotal] = 2
	reply = reply[:fullInfoHead+miLen]

	full := make([]byte, 2*sfInfoSize)
	for i := range 2 {
		e := full[i*sfInfoSize:]
		ne.PutUint32(e[sfID:], uint32(i+1))
		if i == 0 {
			ne.PutUint16(e[sfLocal:], afInet)
			binary.BigEndian.PutUint16(e[sfLocal+2:], 1234)
			copy(e[sfLocal+4:], []byte{10, 0, 0, 1})
			ne.PutUint16(e[sfRemote:], afInet)
			binary.BigEndian.PutUint16(e[sfRemote+2:], 443)
			copy(e[sfRemote+4:], []byte{10, 0, 0, 2})
		} else {
			ne.PutUint16(e[sfLocal:], afInet6)
			binary.BigEndian.PutUint16(e[sfLocal+2:], 5678)
			a := netip.MustParseAddr("fe80::1").As16()
			copy(e[sfLocal+8:], a[:])
			ne.PutUint32(e[sfLocal+24:], 3)
			ne.PutUint16(e[sfRemote:], afInet6)
			binary.BigEndian.PutUint16(e[sfRemote+2:], 443)
			a = netip.MustParseAddr("2001:db8::2").As16()
			copy(e[sfRemote+8:], a[:])
		}
	}
	tfull := make([]byte, 2*tcpInfoMin)
	for i := range 2 {
		e := tfull[i*tcpInfoMin:]
		e[tiState] = 1
		ne.PutUint32(e[tiRTT:], uint32(100*(i+1)))
		ne.PutUint32(e[tiRTTVar:], 50)
		ne.PutUint32(e[tiTotalRetrans:], uint32(i))
		ne.PutUint64(e[tiBytesAcked:], uint64(400+i))
		ne.PutUint64(e[tiBytesReceived:], uint64(1000+i))
	}
	// Re-pack at the requested strides, as the kernel does.
	for i := range 2 {
		sf = append(sf, full[i*sfInfoSize:][:sfStride]...)
		ti = append(ti, tfull[i*tcpInfoMin:][:tiStride]...)
	}
	return reply, sf, ti
}

func TestParse(t *testing.T) {
	v4 := netip.MustParseAddrPort("10.0.0.1:1234")
	for _, tc := range []struct {
		name               string
		num, arrays        uint32
		sfStride, tiStride uint32
		miLen              int
		wantErr            bool
		wantN              int
		check              func(t *testing.T, info Info)
	}{
		{name: "full", num: 2, arrays: 2, sfStride: sfInfoSize, tiStride: tcpInfoMin, miLen: mptcpInfoSize, wantN: 2,
			check: func(t *testing.T, info Info) {
				want0 := Subflow{ID: 1, Local: v4, Remote: netip.MustParseAddrPort("10.0.0.2:443"), RTT: 100 * time.Microsecond,
					RTTVar: 50 * time.Microsecond, BytesAcked: 400, BytesReceived: 1000, State: 1}
				if info.Subflows[0] != want0 {
					t.Errorf("subflow 0 = %+v, want %+v", info.Subflows[0], want0)
				}
				s1 := info.Subflows[1]
				if s1.Local != netip.MustParseAddrPort("[fe80::1%3]:5678") || s1.Remote != netip.MustParseAddrPort("[2001:db8::2]:443") || s1.Retrans != 1 {
					t.Errorf("subflow 1 = %+v", s1)
				}
				if info.Token != 0xdeadbeef || info.ExtraSubflows != 1 || info.AddAddrSignal != 2 || info.AddAddrAccepted != 3 ||
					info.SubflowsMax != 4 || info.SubflowsTotal != 2 || info.Retransmits != 7 || info.BytesSent != 1000 ||
					info.BytesReceived != 2000 || info.BytesAcked != 900 || info.Flags != FlagRemoteKeyReceived || info.Fallback {
					t.Errorf("mptcp info = %+v", info)
				}
			}},
		{name: "more subflows than slots", num: 5, arrays: 2, sfStride: sfInfoSize, tiStride: tcpInfoMin, miLen: mptcpInfoSize, wantN: 2},
		{name: "no mptcp_info copied", num: 2, arrays: 2, sfStride: sfInfoSize, tiStride: tcpInfoMin, miLen: 0, wantN: 2,
			check: func(t *testing.T, info Info) {
				if info.Token != 0 || info.BytesSent != 0 {
					t.Errorf("mptcp info from nothing: %+v", info)
				}
			}},
		{name: "older mptcp_info", num: 2, arrays: 2, sfStride: sfInfoSize, tiStride: tcpInfoMin, miLen: 43, wantN: 2,
			check: func(t *testing.T, info Info) {
				if info.Token != 0xdeadbeef || info.BytesSent != 0 || info.SubflowsTotal != 0 {
					t.Errorf("43-byte mptcp_info: %+v", info)
				}
			}},
		{name: "id-only subflow info, short tcp_info", num: 2, arrays: 2, sfStride: 4, tiStride: 104, miLen: mptcpInfoSize, wantN: 2,
			check: func(t *testing.T, info Info) {
				s := info.Subflows[0]
				if s.ID != 1 || s.Local.IsValid() || s.RTT != 100*time.Microsecond || s.BytesAcked != 0 {
					t.Errorf("short strides: %+v", s)
				}
			}},
		{name: "local address only", num: 1, arrays: 2, sfStride: sfRemote, tiStride: tcpInfoMin, miLen: mptcpInfoSize, wantN: 1,
			check: func(t *testing.T, info Info) {
				if s := info.Subflows[0]; s.Local != v4 || s.Remote.IsValid() {
					t.Errorf("%+v", s)
				}
			}},
		{name: "zero stride", num: 2, arrays: 2, sfStride: 0, tiStride: tcpInfoMin, miLen: mptcpInfoSize, wantErr: true},
		{name: "no subflows", num: 0, arrays: 2, sfStride: sfInfoSize, tiStride: tcpInfoMin, miLen: mptcpInfoSize, wantN: 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reply, sf, ti := build(tc.num, tc.arrays, tc.sfStride, tc.tiStride, tc.miLen)
			info, err := parseFull(reply, sf, ti)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if err != nil {
				return
			}
			if len(info.Subflows) != tc.wantN {
				t.Fatalf("%d subflows, want %d", len(info.Subflows), tc.wantN)
			}
			if tc.check != nil {
				tc.check(t, info)
			}
		})
	}
	// Arrays shorter than the head claims, and heads cut short.
	reply, sf, ti := build(2, 2, sfInfoSize, tcpInfoMin, mptcpInfoSize)
	if _, err := parseFull(reply, sf[:sfInfoSize], ti); err == nil {
		t.Error("short subflow array: no error")
	}
	for n := range fullInfoHead {
		if _, err := parseFull(reply[:n], sf, ti); err == nil {
			t.Errorf("%d-byte reply: no error", n)
		}
	}
}

func FuzzParse(f *testing.F) {
	reply, sf, ti := build(2, 2, sfInfoSize, tcpInfoMin, mptcpInfoSize)
	f.Add(append(append(append([]byte{}, reply...), sf...), ti...), uint16(len(reply)), uint16(len(sf)))
	reply, sf, ti = build(2, 2, 4, 104, 43)
	f.Add(append(append(append([]byte{}, reply...), sf...), ti...), uint16(len(reply)), uint16(len(sf)))
	f.Add([]byte{}, uint16(0), uint16(0))
	f.Fuzz(func(t *testing.T, b []byte, a, c uint16) {
		i := min(int(a), len(b))
		j := min(i+int(c), len(b))
		info, err := parseFull(b[:i], b[i:j], b[j:])
		if err != nil {
			return
		}
		h, _ := parseHead(b[:i])
		if uint32(len(info.Subflows)) > min(h.numSubflows, h.arraysUser) {
			t.Fatalf("%d subflows from a head allowing %d", len(info.Subflows), min(h.numSubflows, h.arraysUser))
		}
		for _, s := range info.Subflows {
			parseSockaddr(s.Local.Addr().AsSlice()) // exercise, must not panic
		}
	})
}

func TestByAddr(t *testing.T) {
	ap := netip.MustParseAddrPort
	a, b := ap("192.0.2.2:40000"), ap("100.64.0.2:40001")
	srv, srv2 := ap("203.0.113.1:7100"), ap("203.0.113.1:7101")
	info := Info{Subflows: []Subflow{
		// The first subflow, closed: its bytes count, it is no path.
		{ID: 1, Local: a, Remote: srv, BytesReceived: 100, BytesAcked: 10, State: 7},
		{ID: 2, Local: b, Remote: srv, BytesReceived: 200, BytesAcked: 20, State: StateEstablished},
		{ID: 3, Local: ap("[::ffff:192.0.2.2]:40002"), Remote: srv2, BytesReceived: 300, BytesAcked: 30, State: StateEstablished},
	}}
	tests := []struct {
		name   string
		remote bool
		want   []AddrShare
	}{
		{"local", false, []AddrShare{
			{Addr: a.Addr(), Subflows: 1, BytesReceived: 400, BytesAcked: 40},
			{Addr: b.Addr(), Subflows: 1, BytesReceived: 200, BytesAcked: 20},
		}},
		{"remote", true, []AddrShare{
			{Addr: srv.Addr(), Subflows: 2, BytesReceived: 600, BytesAcked: 60},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := info.ByAddr(tt.remote); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("ByAddr(%v) = %+v, want %+v", tt.remote, got, tt.want)
			}
		})
	}
	if got := (Info{}).ByAddr(false); got != nil {
		t.Errorf("no subflows: %+v", got)
	}
}
